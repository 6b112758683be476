"""A reward model: our transformer with a scalar head, in the Hugging Face sequence-classification layout.

The layout is what `LlamaForSequenceClassification` (Mistral-, Qwen2-) with `num_labels=1` reads:
    model.*          the backbone tensors (the causal LM's names, without lm_head.weight)
    score.weight     [1, H], no bias
    config.json      architectures [...ForSequenceClassification], num_labels 1, pad_token_id
The reward of a sequence is score(final-norm hidden state) at its LAST NON-PAD token (the rightmost token
whose id differs from pad_token_id), the rule transformers applies; `last_index` is that rule on one
sequence, so a reply ending in EOS is read at EOS unless pad_token_id == EOS (then at the token before it,
in both implementations).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from selfreward.model.checkpoint import CheckpointError, TOKENIZER_FILES, _atomic_dir_write, _tensor_files, \
    hf_tensors, name_table
from selfreward.model.config import ModelConfig
from selfreward.model.llama import AttnContext, Transformer

_ARCH = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
         "qwen2": "Qwen2ForSequenceClassification"}


def is_reward_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and any(a.endswith("ForSequenceClassification")
                                for a in json.loads(cfg.read_text()).get("architectures") or [])


def add_score_head(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Drop the LM head and attach `score` (H -> 1, seeded normal init as transformers' initializer_range)."""
    model.output = None
    g = torch.Generator().manual_seed(seed)
    p = model.tok_embeddings.weight
    model.score = nn.Linear(model.cfg.hidden_size, 1, bias=False, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(1, model.cfg.hidden_size, generator=g) * std)
    return model


def _backbone_table(cfg: ModelConfig) -> dict[str, str]:
    return {k: v for k, v in name_table(cfg).items() if k != "output.weight"}


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                      cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
    """A reward checkpoint (score.weight read), or a causal LM checkpoint (fresh seeded score head)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    cfg = cfg or ModelConfig.from_json(path)
    cfg.tie_word_embeddings = True        # no LM head: the embedding is the only vocabulary matrix
    files = _tensor_files(path)
    reward = "score.weight" in files
    with torch.device("meta"):
        model = Transformer(cfg)
    state, want = {}, model.state_dict()
    for ours, hf in _backbone_table(cfg).items():
        if hf not in files:
            raise CheckpointError(f"{path}: missing tensor '{hf}' (needed for {ours})")
        with safe_open(str(files[hf]), "pt") as f:
            state[ours] = f.get_tensor(hf).to(dtype)
        if state[ours].shape != want[ours].shape:      # as load_model: name the tensor, not a load_state_dict trace
            raise CheckpointError(f"{files[hf]}: tensor '{hf}' has shape {tuple(state[ours].shape)}, config says "
                                  f"{tuple(want[ours].shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    model.inv_freq = cfg.inv_freq().to(device)
    model = add_score_head(model.to(dtype=dtype), seed)
    if reward:
        with safe_open(str(files["score.weight"]), "pt") as f:
            w = f.get_tensor("score.weight")
        if tuple(w.shape) != (1, cfg.hidden_size):
            raise CheckpointError(f"{files['score.weight']}: tensor 'score.weight' has shape {tuple(w.shape)}, "
                                  f"expected (1, {cfg.hidden_size}) (num_labels must be 1)")
        with torch.no_grad():
            model.score.weight.copy_(w.to(dtype))
    return model


def save_reward_model(model_or_sd, cfg: ModelConfig, out: str | Path, pad_token_id: int,
                      tokenizer_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the sequence-classification folder. `model_or_sd`: the module or a full state dict (our names)."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    tensors = hf_tensors(sd, dict(_backbone_table(cfg), **{"score.weight": "score.weight"}), dtype)

    def write(tmp: Path):
        import shutil
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = cfg.to_hf_dict()
        hf.update(architectures=[_ARCH[cfg.model_type]], num_labels=1, id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, pad_token_id=int(pad_token_id), tie_word_embeddings=False,
                  torch_dtype=str(next(iter(tensors.values())).dtype).replace("torch.", ""))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copy(src, tmp / name)

    _atomic_dir_write(Path(out), write)
    return Path(out)


def last_index(ids: list[int], pad_id: int) -> int:
    """The position transformers reads the score at: the rightmost token that is not pad (0 if none)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_id:
            return i
    return 0


def packed_rewards(model: Transformer, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Rewards of S sequences in ONE forward over a flat token axis -> [S] fp32."""
    dev = model.tok_embeddings.weight.device
    lens = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    tokens = torch.tensor([t for s in seqs for t in s], device=dev)                     # [N]
    positions = torch.cat([torch.arange(n) for n in lens]).to(dev)                      # [N]
    h = model(tokens, positions, AttnContext(cu.to(dev), max(lens)))                   # [N, H]
    rows = torch.tensor([int(cu[i]) + last_index(s, pad_id) for i, s in enumerate(seqs)], device=dev)
    return model.score(h[rows]).squeeze(-1).float()                                    # [S]


def read_pad_id(path: str | Path) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    if cfg.get("pad_token_id") is None:
        raise CheckpointError(f"{Path(path) / 'config.json'}: field 'pad_token_id' is missing (a reward "
                              f"checkpoint needs it: the score is read at the last non-pad token)")
    return int(cfg["pad_token_id"])
