"""selfreward: the repository root as one Python package (a single top-level name); kernels/, model/, infer/,
train/, recipes/ are its subpackages. Scripts keep their paths (`torchrun train/dpo.py`) and import through the
installed package (`pip install -e .`)."""
