#!/usr/bin/env bash
# The README's test command: install (CPU torch wheel first, so pip never pulls the CUDA build), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -p no:cacheprovider "$@"
