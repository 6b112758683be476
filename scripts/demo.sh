#!/usr/bin/env bash
# The README's main command: install what the demo needs (CPU torch wheel first, so pip never pulls the CUDA
# build; matplotlib for the plot; the versions in constraints.txt), then run the whole self-rewarding loop on the embedded world.
#   bash scripts/demo.sh                      # the default run: runs/world (M0 ships in recipes/world/m0)
#   bash scripts/demo.sh --seed 1 --run-dir runs/world-s1
#   bash scripts/demo.sh --scale 2 --iterations 3
# Any flag is passed to `python -m selfreward.recipes.world.demo` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pin=${SRLM_CONSTRAINTS-constraints.txt}   # the versions CI last passed with; SRLM_CONSTRAINTS= (empty): newest
python -c "import os, selfreward, matplotlib, jinja2, tokenizers, google.protobuf; raise SystemExit(not os.path.samefile(os.path.dirname(selfreward.__file__), '.'))" \
    2>/dev/null || pip install -q ${pin:+-c "$pin"} -e ".[plot]" || pip install -q ${pin:+-c "$pin"} -e .
n=$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( n < 4 ? n : 4 ))}   # M0's batches of 128 gain from 2+ threads
exec python -u -m selfreward.recipes.world.demo "$@"
