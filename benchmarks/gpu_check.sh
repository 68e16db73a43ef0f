#!/usr/bin/env bash
# The GPU check in one command: prints one JSON line (see benchmarks/gpu_check.py for what it measures).
# On a machine without a CUDA GPU it says so, runs the same code paths at tiny sizes, and exits 0.
#
#   bash benchmarks/gpu_check.sh            # on one GPU: under 8 minutes
#   bash benchmarks/gpu_check.sh --smoke    # the tiny run, even on a GPU
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python3 benchmarks/gpu_check.py "$@"
