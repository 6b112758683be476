"""selfreward: the repository root as one Python package, so the install claims a single top-level name.

The folders the design card lists (kernels/, model/, infer/, train/, recipes/) are its subpackages:
`from selfreward.model.checkpoint import load_model`. Scripts keep their paths (`torchrun train/dpo.py`)
and import through the installed package (`pip install -e .`, which both README commands run).
"""
