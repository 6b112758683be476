#!/usr/bin/env bash
# The README's test command: install (CPU torch wheel first, so pip never pulls the CUDA build), then pytest.
# The install takes constraints.txt (the versions CI last passed with); SRLM_CONSTRAINTS= (empty) installs the
# newest releases instead, SRLM_CONSTRAINTS=FILE another pin set.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pin=${SRLM_CONSTRAINTS-constraints.txt}
# (re)install unless `selfreward` already imports from this very tree with what the tests need (a rerun)
python -c "import os, selfreward, pytest, hypothesis, kernels, scipy, gguf, datasets, tensorboard, jinja2, tokenizers, google.protobuf; raise SystemExit(not os.path.samefile(os.path.dirname(selfreward.__file__), '.'))" \
    2>/dev/null || pip install -q ${pin:+-c "$pin"} -e ".[dev]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ $# -gt 0 ]; then      # a chosen subset: run it as given (kernel tests need TRITON_INTERPRET=1 set)
    exec python -m pytest -q -p no:cacheprovider "$@"
fi
python -m pytest -q -p no:cacheprovider --ignore-glob='tests/test_kernels*'
# The Triton kernel tests get their own process: triton reads TRITON_INTERPRET when it is first imported,
# and with it set `kernels.ops.use_triton` sends every CPU op through the (slow) interpreter.
TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/test_kernels*.py
