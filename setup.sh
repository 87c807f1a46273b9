#!/usr/bin/env bash
# Set-up for emorph on a fresh machine.
#   bash setup.sh          -> the package with ONNX Runtime and OpenVINO (the user install; OpenVINO runs the
#                             packaged model in bf16 on CPUs with AVX512-BF16/AMX)
#   bash setup.sh --dev    -> the same plus TensorRT-RTX (CPU-only engine builds), OpenVINO + NNCF (the [cpu]
#                             extra, so the OpenVINO tests run) and the test tools
#   bash setup.sh --suite  -> the user install plus the validation suite (ANTs, greedy, pydeface's mean head;
#                             ITK's example T1 from Debian's insighttoolkit5-examples where apt-get is usable)
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
extras="onnx,openvino"
if [[ "${1:-}" == "--dev" ]]; then
    extras="onnx,openvino,tensorrt,cpu,dev"
elif [[ "${1:-}" == "--suite" ]]; then
    extras="onnx,openvino,peers,realbrains"
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
        apt-get install -y -q insighttoolkit5-examples >/dev/null \
            || echo "setup: insighttoolkit5-examples not installed (run apt-get update first); the suite skips 'itk'"
    else
        echo "setup: no root apt-get: the validation suite will skip ITK's example T1 ('itk')"
    fi
fi
"$PY" -m pip install -q -e ".[${extras}]"
echo "setup: installed emorph-deploy[${extras}]"
