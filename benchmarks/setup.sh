#!/usr/bin/env bash
# Real models + the benchmark environment (not part of CI: the MiniLM export needs torch).
# Uses ../shared/realmodels: two virtual environments and the models under $REALMODELS_ROOT,
# then installs this checkout (editable) into the recipes' environment.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
recipes=${REALMODELS_RECIPES:-$repo/../shared/realmodels}
R=${REALMODELS_ROOT:-/tmp/realmodels}
if [ ! -x "$R/venv/bin/python" ] || [ ! -x "$R/venv-torch/bin/python" ]; then
  bash "$recipes/setup.sh"
fi
if [ ! -f "$R/models/minilm/all-MiniLM-L6-v2.onnx" ] || [ ! -f "$R/models/rapidocr_ppocrv4/ch_PP-OCRv4_det_infer.onnx" ]; then
  bash "$recipes/run.sh"
fi
"$R/venv/bin/pip" install -q -e "$repo"
# the float16 benchmark's peer (bench_float16.py); its protobuf/onnx needs are met by the recipes' venv
"$R/venv/bin/pip" install -q "onnxconverter-common==1.16.0"
echo "benchmark environment ready: $R/venv/bin/python"
