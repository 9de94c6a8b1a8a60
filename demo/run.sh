#!/usr/bin/env bash
# The pack's main job, headless, on the embedded default model: sets up the cached
# environment (venv + upstream ComfyUI 0.3.75, see tests/setup_env.sh), then runs
# demo/forget_concepts.py, which erases two concepts through a real ComfyUI and writes the
# before/after grid, the mask report and the metrics to --out (default out/demo).
#     bash demo/run.sh [--forget cross,triangle] [--out DIR] [--mode exact] ...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(bash tests/setup_env.sh | tail -n 1)
exec "$PY" -m demo.forget_concepts "$@"
