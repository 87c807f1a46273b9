#!/usr/bin/env bash
# Set-up for emorph on a fresh machine.
#   bash setup.sh          -> the package with ONNX Runtime (the user install)
#   bash setup.sh --dev    -> the same plus TensorRT-RTX (CPU-only engine builds) and the test tools
# torch is installed first as the CPU build 2.13.0 only when no torch is importable: an existing
# (e.g. CUDA) torch is left alone.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch found; installing the CPU build torch==2.13.0"
    "$PY" -m pip install -q "torch==2.13.0"
else
    echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
extras="onnx"
if [[ "${1:-}" == "--dev" ]]; then
    extras="onnx,tensorrt,dev"
fi
"$PY" -m pip install -q -e ".[${extras}]"
echo "setup: installed emorph-deploy[${extras}]"
