"""Direct preference optimisation with the fused one-pass loss.

    torchrun --nproc_per_node 8 train/dpo.py --model M1 --data pairs.jsonl --output runs/m2 --beta 0.1
    python train/dpo.py --model M1 --data pairs.jsonl --output runs/m2 --loss simpo --beta 2.0

The reference is the starting checkpoint in eval mode, cached before training (--ref-mode cache) or a frozen
copy (online). The loss variants, the reference, metrics.jsonl: train/README.md, "The DPO step".
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

import selfreward.kernels.ops as K
from selfreward.cli import choice, passive
from selfreward.train import loop
from selfreward.train.config import TrainConfig
from selfreward.train.data import Pair, load_pairs, pair_batch
from selfreward.train.dpo_head import pair_head_loss
from selfreward.train.loop import cli, eval_sums, load_policy, load_reference
from selfreward.train.losses import LOSS_TYPES, DPOLossConfig, ReferenceCache, compute_reference, dpo_loss, \
    resolve_loss_settings, sequence_logps, weights_hash
from selfreward.train.parallel import Dist, all_reduce

STATS = ("loss_sum", "reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen",
         "logp_rejected", "len_chosen", "len_rejected")


@dataclass
class DPOConfig(TrainConfig):
    lr: float = 1e-6                  # paper: 1e-6 -> 1e-7, beta 0.1, global batch 16, dropout 0.1
    final_lr: float = 1e-7
    beta: float | None = None         # unset = the loss's paper: 0.1 (DPO family), 2.0 (simpo)
    loss: str = choice(*LOSS_TYPES)   # sigmoid | ipo | cdpo (label-smoothed) | robust (rDPO) | simpo (reference-free)
    label_smoothing: float | None = None  # cdpo / robust only: assumed share of flipped labels; unset = 0.1
    simpo_gamma: float | None = None  # simpo only: target margin between length-normalised rewards; unset = 0.5 x beta
    nll_alpha: float = 0.0            # + alpha * chosen per-token NLL (RPO); 0 = plain DPO
    max_prompt_length: int = 0        # 0 = max_length // 2; prompts keep BOS + their last tokens
    ref_mode: str = choice("cache", "online")
    ref_cache_dir: str = passive("")           # default OUTPUT/ref_cache
    export_every: int = passive(0)             # HF export every N steps to OUTPUT/exports/step_N (for recipes.select); 0 = off
    share_prompt: bool = True         # each distinct prompt of a micro-batch computed once (train/data.pair_batch)
    selective_checkpointing: bool = True   # about half the activations, a few % of time (benchmarks/README.md)
    release_freed_memory: bool = passive(True)   # CPU: lower peak RSS for some time (train/README.md, "Memory on the CPU")
    fused_head: bool = passive(True)           # LM head forward + backward in one pass per group of pairs (CPU; dpo_head.py)

    def __post_init__(self):   # unset loss settings take the loss's paper defaults; flags it doesn't use: refused
        self.beta, self.label_smoothing, self.simpo_gamma = resolve_loss_settings(
            self.loss, self.beta, self.label_smoothing, self.simpo_gamma)


class DPOTask(loop.Task):
    """The pairs, the policy, and the reference: a cached table of log-probs, or a frozen model (online)."""

    def __init__(self, cfg: DPOConfig, d: Dist, tok):
        self.cfg = cfg
        mpl = cfg.max_prompt_length or cfg.max_length // 2
        self.train, counts = load_pairs(cfg.data, tok, cfg.max_length, mpl)
        d.print(f"[dpo] read {counts['read']} pairs; truncated (prompt to {mpl}, total to {cfg.max_length} "
                f"tokens): {counts['truncated']}")
        self.counts = {"truncated": counts["truncated"]}
        self.lcfg = DPOLossConfig(cfg.loss, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.nll_alpha)
        cache = self.lcfg.needs_reference and cfg.ref_mode == "cache"
        key = lambda m: setattr(self, "key", weights_hash(m.state_dict()))  # noqa: E731  (of the whole weights)
        self.model = load_policy(cfg, d, prepare=key if cache else None)
        self.ref_table = reference_table(cfg, self.model, self.train, self.key, d) if cache else None
        self.ref_model = load_reference(cfg, d) if self.lcfg.needs_reference and not cache else None
        if cache and cfg.dropout > 0:
            warn_dropout_shift(cfg, self.model, self.train, self.ref_table, d)

    def micro(self, model, idx: list[int]):
        b, B, ref = pair_batch([self.train[i] for i in idx], self.cfg.share_prompt), len(idx), None
        if self.ref_table is not None:
            ref = self.ref_table[idx].T.flatten()                        # [B, 2] -> [2B], chosen first
        elif self.ref_model is not None:
            with torch.no_grad():
                ref = sequence_logps(self.ref_model, b)
        if self.cfg.fused_head and not K.use_triton(model.lm_head_weight):
            fn = lambda lp, sub: dpo_loss(lp, None if ref is None else ref[sub], b.resp_len[sub], self.lcfg)
            loss_sum, pol, loss, rc, rr = pair_head_loss(model, b, fn)
        else:   # CUDA: the Triton log-prob kernel, autograd through the summed log-probs
            pol = sequence_logps(model, b)                               # [2B], ONE forward
            loss, rc, rr = dpo_loss(pol, ref, b.resp_len, self.lcfg)
            loss_sum = loss.sum()
        lens = b.resp_len.double()
        st = dict(zip(STATS, (loss.sum(), rc.sum(), rr.sum(), (rc - rr).sum(), (rc > rr).double().sum(),
                              pol[:B].sum(), pol[B:].sum(), lens[:B].sum(), lens[B:].sum())))
        st["tokens"] = torch.tensor(float(b.tokens.numel()))
        return loss_sum, st

    def summarize(self, s: dict, norm: float) -> dict:
        return {("loss" if k == "loss_sum" else k): s[k] / norm for k in STATS}


def warn_dropout_shift(cfg: DPOConfig, model, pairs: list[Pair], ref: torch.Tensor, d: Dist, n: int = 4,
                       limit: float = 0.25) -> float:
    """At the start the policy is the reference, so DPO's log-ratios begin at 0, but the policy runs with
    --dropout and the reference without. On a checkpoint trained without dropout (most Llama-family releases)
    dropout 0.1 moves its log-probs by nats per token, and DPO's first losses are far from ln 2 (SmolLM2-135M:
    111). One forward of the first n pairs in train mode against their reference log-probs measures that shift
    per response token; above `limit`, a warning names the flag. The RNG is put back: training draws the same
    dropout masks as without this check. Returns the shift."""
    idx = list(range(min(n, len(pairs))))
    b = pair_batch([pairs[i] for i in idx], cfg.share_prompt)
    cuda = d.device.type == "cuda"
    state = torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None
    with torch.no_grad(), loop.cpu_autocast(cfg, d):
        pol = sequence_logps(model, b).cpu()
    torch.set_rng_state(state[0])
    if cuda:
        torch.cuda.set_rng_state(state[1])
    shift = float(((pol - ref[idx].T.flatten()).abs() / b.resp_len.double().clamp(min=1)).mean())
    if shift > limit:
        d.print(f"[dpo] warning: --dropout {cfg.dropout} moves this checkpoint's log-probs by {shift:.2f} nats per "
                f"response token from the reference's (no dropout), so DPO does not start at its log-ratio 0; a "
                f"checkpoint trained without dropout wants --dropout 0 (TRL's default)")
    return shift


def reference_table(cfg: DPOConfig, model, pairs: list[Pair], key: str, d: Dist) -> torch.Tensor:
    """The cached reference log-probs [pairs, 2], or computed with the (still untrained) model: loop.eval_sums,
    each rank its rows of a zero table, in the policy's precision (--cpu-bf16: under the same autocast, so the
    first step's log-ratios are 0, not bf16's rounding of each sequence; the cache is keyed by it)."""
    bf16 = cfg.cpu_bf16 and d.device.type == "cpu"
    cache = ReferenceCache(cfg.ref_cache_dir or Path(cfg.output) / "ref_cache", pairs, key + "-cpubf16" * bf16)
    table = cache.load()
    ok = torch.tensor([float(table is not None and table.shape == (len(pairs), 2))])
    if all_reduce(ok, d).item() == d.world:      # every rank sees it (multi-node: each its own disk)
        d.print(f"[dpo] reference log-probs from cache {cache.path}")
        return table

    def rows(model, idx: list[int]) -> torch.Tensor:
        t = torch.zeros(len(pairs), 2, dtype=torch.float64)
        t[idx] = compute_reference(model, pairs, idx, len(idx), cfg.share_prompt).cpu()
        return t.flatten()
    t0 = time.perf_counter()
    with loop.cpu_autocast(cfg, d):
        table = eval_sums(model, list(range(len(pairs))), d, cfg.micro_batch_size or max(1, cfg.batch_size // d.world),
                          rows).view(-1, 2)
    if d.is_main:
        cache.save(table)
        print(f"[dpo] reference log-probs of {len(pairs)} pairs cached in {cache.path} "
              f"({time.perf_counter() - t0:.2f} s)")     # benchmarks/bench_dpo.py reads this figure
    return table


train, main = loop.entry(DPOConfig, "dpo", DPOTask, __doc__)

if __name__ == "__main__":
    cli(main)
