#!/usr/bin/env bash
# One command: set up the real models (first time only), then run a benchmark script.
#   bash benchmarks/run.sh quantize [args]   ->  benchmarks/bench_quantize.py
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
R=${REALMODELS_ROOT:-/tmp/realmodels}
name=${1:?usage: benchmarks/run.sh NAME [args]  (NAME: $(cd "$here" && ls bench_*.py 2>/dev/null | sed 's/bench_//; s/\.py//' | tr '\n' ' '))}
shift
bash "$here/setup.sh"
cd "$here/.."
exec "$R/venv/bin/python" "$here/bench_$name.py" "$@"
