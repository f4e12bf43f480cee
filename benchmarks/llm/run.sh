#!/usr/bin/env bash
# The decoder-LLM benchmark (issue 17), not part of CI: its own environment (torch CPU, transformers,
# tokenizers, onnxruntime-genai and its builder), a model trained here (about 25 min on 2 cores),
# then every tool on it.
#   bash benchmarks/llm/run.sh [WORK_DIR]   ->  benchmarks/results/llm.md
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${1:-${LLM_BENCH_ROOT:-/tmp/llm-bench}}
venv="$work/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3.11 -m venv "$venv"
  # torch 2.13.0: the CPU build on this machine's disk (a plain 'torch' would fetch a CUDA build)
  "$venv/bin/pip" install -q torch==2.13.0 transformers tokenizers onnxruntime-genai onnx_ir
  "$venv/bin/pip" install -q -e "$repo"
fi
if [ ! -f "$work/checkpoint/train.json" ]; then
  "$venv/bin/python" "$here/train.py" "$work/checkpoint"
fi
rm -rf "$work/rows"
exec "$venv/bin/python" "$here/bench_llm.py" "$work/checkpoint" "$work/rows" --output "$repo/benchmarks/results/llm.md"
