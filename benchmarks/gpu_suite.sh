#!/usr/bin/env bash
# Every GPU figure the project claims, in one table (about 8 minutes on one H100).
# Options are passed on: --skip STEPS, --work DIR, --small (CPU plumbing check). See gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python benchmarks/gpu_suite.py "$@"
