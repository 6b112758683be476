"""A reward model: our transformer with a scalar head, in the Hugging Face sequence-classification layout
that `LlamaForSequenceClassification` (Mistral-, Qwen2-) with `num_labels=1` reads:
    model.*          the backbone tensors (the causal LM's names, without lm_head.weight)
    score.weight     [1, H], no bias
    config.json      architectures [...ForSequenceClassification], num_labels 1, pad_token_id
A sequence's reward is score(final-norm hidden state) at its LAST NON-PAD token (transformers' rule): a reply
ending in EOS is read at EOS unless pad_token_id == EOS (then at the token before, in both implementations).
`RMReward` is `--reward rm`: reward(prompts, responses) -> scores.
"""

from itertools import accumulate
from pathlib import Path

import torch
import torch.nn as nn

from selfreward.model.checkpoint import CheckpointError, load_model, open_safetensors, save_model, tensor_files
from selfreward.model.config import ARCH, ModelConfig
from selfreward.model.llama import Transformer
from selfreward.model.tokenizer import Tokenizer


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                      cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
    """A reward checkpoint (score.weight read), or a causal LM checkpoint (the LM head dropped, a fresh score
    head: seeded normal init, std 0.02 as transformers' initializer_range)."""
    cfg = cfg or ModelConfig.from_json(path)
    cfg.tie_word_embeddings = True        # no LM head: the embedding is the only vocabulary matrix
    model, H = load_model(path, dtype, device, cfg, ignore=("score.weight",)), cfg.hidden_size
    w = torch.randn(1, H, generator=torch.Generator().manual_seed(seed)) * 0.02
    if (f := tensor_files(Path(path)).get("score.weight")) is not None:
        with open_safetensors(f) as h:
            w = h.get_tensor("score.weight")
        if tuple(w.shape) != (1, H):
            raise CheckpointError(f"{f}: tensor 'score.weight' has shape {tuple(w.shape)}, "
                                  f"expected (1, {H}) (num_labels must be 1)")
    model.score = nn.Linear(H, 1, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        model.score.weight.copy_(w)
    return model


def seq_cls_config(cfg: ModelConfig, pad_token_id: int) -> dict:
    """config.json's sequence-classification fields (over the causal LM's), for save_model's `hf_config`."""
    return dict(architectures=[ARCH[cfg.model_type] + "ForSequenceClassification"], num_labels=1,
                id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=int(pad_token_id),
                tie_word_embeddings=False)


def save_reward_model(model_or_sd, cfg: ModelConfig, out: str | Path, pad_token_id: int,
                      tokenizer_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the sequence-classification folder. `model_or_sd`: the module or a full state dict (our names)."""
    return save_model(model_or_sd, cfg, out, tokenizer_dir, dtype=dtype, hf_config=seq_cls_config(cfg, pad_token_id))


def packed_rewards(model: Transformer, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Rewards of S sequences in ONE forward over a flat token axis -> [S] fp32."""
    dev = model.tok_embeddings.weight.device
    tokens = torch.tensor([[t for s in seqs for t in s]], device=dev)                   # [1, N]
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).to(dev)[None]            # [1, N]
    h = model.forward_packed(tokens, positions)[0]                                      # [N, H]
    # each sequence's rightmost token that is not pad (0 if none): where transformers reads the score
    rows = [a + next((i for i in range(len(s) - 1, -1, -1) if s[i] != pad_id), 0)
            for a, s in zip(accumulate(map(len, seqs), initial=0), seqs)]
    return model.score(h[torch.tensor(rows, device=dev)]).squeeze(-1).float()           # [S]


class RMReward:
    """`--reward rm` (train/rl.py): the score of chat(prompt) + reply, `batch` sequences per forward."""

    def __init__(self, path: str | Path, template=None, device="cpu", dtype=torch.float32, batch: int = 32):
        self.model = load_reward_model(path, dtype=dtype, device=device).eval()
        self.tok, self.batch, self.max_len = Tokenizer.load(path), batch, self.model.cfg.max_position_embeddings
        if (pad := self.model.cfg.extra.get("pad_token_id")) is None:
            raise CheckpointError(f"{Path(path) / 'config.json'}: field 'pad_token_id' is missing (a reward "
                                  f"checkpoint needs it: the score is read at the last non-pad token)")
        self.pad_id = int(pad)

    def ids(self, prompt: str, response: str) -> list[int]:
        p = self.tok.user_ids(prompt)
        r = self.tok.render_response(response)
        r = r[:self.max_len // 2] if len(p) + len(r) > self.max_len and len(r) > self.max_len // 2 else r
        room = self.max_len - len(r)          # a long prompt keeps BOS and its last tokens (as train/rm.py)
        return (p if len(p) <= room else p[:1] + p[len(p) - room + 1:]) + r

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs = [self.ids(p, r) for p, r in zip(prompts, responses)]
        return [x for s in range(0, len(seqs), self.batch)
                for x in packed_rewards(self.model, seqs[s:s + self.batch], self.pad_id).tolist()]
