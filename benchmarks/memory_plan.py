"""The memory plan of infer/README.md and train/README.md, computed from its formulas (no GPU needed).

    python benchmarks/memory_plan.py            # prints the tables the READMEs quote

Every number is a formula over the config (layers L, hidden H, heads nh, KV heads nkv, head_dim hd,
intermediate I, vocab V) and stated assumptions; none is a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
GPU = 80 * GiB          # an "80 GB" A100 / H100 holds 80 GiB
USABLE = 0.9 * GPU      # what we plan to fill: context, allocator slack and fragmentation take the rest
RESERVE = 2 * GiB       # sampler: CUDA context + NCCL buffers + one step's activations (see infer/README.md)


@dataclass
class Cfg:
    name: str
    L: int
    H: int
    nh: int
    nkv: int
    I: int
    V: int
    tied: bool = False

    @property
    def hd(self) -> int:
        return self.H // self.nh

    @property
    def block(self) -> int:    # parameters of one transformer block
        return self.H * self.nh * self.hd * 2 + 2 * self.H * self.nkv * self.hd + 3 * self.H * self.I + 2 * self.H

    @property
    def root(self) -> int:     # embedding + LM head + final norm
        return self.V * self.H * (1 if self.tied else 2) + self.H

    @property
    def params(self) -> int:
        return self.L * self.block + self.root

    @property
    def norms(self) -> int:
        return (2 * self.L + 1) * self.H


LLAMA2_70B = Cfg("Llama 2 70B", L=80, H=8192, nh=64, nkv=8, I=28672, V=32000)
LLAMA3_8B = Cfg("Llama 3 8B", L=32, H=4096, nh=32, nkv=8, I=14336, V=128256)


# -- sampler (bf16, TP T): ----------------------------------------------------------------------
def weights_per_rank(c: Cfg, T: int) -> float:
    """2 bytes x (sharded parameters / T + replicated norms); KV heads replicated when nkv < T."""
    kv = 2 * c.L * c.H * c.nkv * c.hd
    kv_rank = kv / T if c.nkv >= T else kv / c.nkv
    return 2 * ((c.params - c.norms - kv) / T + kv_rank + c.norms)


def kv_per_token(c: Cfg, T: int) -> float:
    """K and V, every layer, this rank's KV heads, bf16: 2 * L * max(1, nkv / T) * hd * 2 bytes."""
    return 2 * c.L * max(1, c.nkv // T) * c.hd * 2


def sampler_rows(c: Cfg, layouts, contexts):
    rows = []
    for T, R in layouts:
        w = weights_per_rank(c, T)
        kv = kv_per_token(c, T)
        budget = USABLE - w - RESERVE
        seqs = [int(budget // (kv * C)) if budget > 0 else 0 for C in contexts]
        rows.append((f"TP {T} x {R}", w / GiB, kv / 1024, budget / GiB, seqs, [s * R for s in seqs]))
    return rows


# -- DPO under FSDP2 over N GPUs (fp32 master weights, bf16 compute, AdamW): ------------------------
def act_per_token_layer(c: Cfg) -> int:
    """Bytes autograd keeps per token per block in bf16: norm inputs and outputs (4H), q/k/v (H + 2 kvd),
    attention output (H), gate/up/swiglu outputs (3I), plus two 1-byte dropout masks (2H)."""
    return 2 * (6 * c.H + 2 * c.nkv * c.hd + 3 * c.I) + 2 * c.H


def dpo_rows(c: Cfg, gpus, tokens: int):
    states = 16 * c.params                       # fp32 weights 4 + grads 4 + AdamW m, v 8 bytes / param
    transient = 10 * c.block + 8 * c.root        # 2 gathered blocks bf16 (4) + a block's grad bf16 + fp32 (6);
    #                                              root gathered bf16 (2) + its grad bf16 + fp32 (6)
    a = act_per_token_layer(c)
    act = tokens * c.L * a                       # no activation checkpointing
    act_ckpt = tokens * c.L * 2 * c.H + tokens * a   # block inputs kept, one block recomputed at a time
    logits = 2 * 1024 * c.V * 4                  # one chunk of fused log-probs: fp32 logits + their grad
    rows = []
    for N in gpus:
        base = states / N + transient + logits
        rows.append((N, states / N / GiB, transient / GiB, act / GiB, act_ckpt / GiB,
                     (base + act) / GiB, (base + act_ckpt) / GiB))
    return rows


def main() -> None:
    for c in (LLAMA2_70B, LLAMA3_8B):
        print(f"{c.name}: L {c.L}, H {c.H}, nh {c.nh}, nkv {c.nkv}, hd {c.hd}, I {c.I}, V {c.V}: "
              f"{c.params:,} parameters ({c.block:,} per block, {c.root:,} root)")
    print(f"\nsampler, bf16, usable {USABLE / GiB:.0f} GiB per GPU, reserve {RESERVE / GiB:.0f} GiB")
    for c, contexts in ((LLAMA2_70B, (1024, 4096)), (LLAMA3_8B, (2048, 8192))):
        print(f"\n{c.name} | weights/rank GiB | KV/token/rank KiB | KV budget/rank GiB | "
              + " | ".join(f"seqs/replica @{C}" for C in contexts) + " | "
              + " | ".join(f"seqs/node @{C}" for C in contexts))
        layouts = ((8, 1), (4, 2)) if c is LLAMA2_70B else ((8, 1), (4, 2), (1, 8))
        for name, w, kv, b, seqs, node in sampler_rows(c, layouts, contexts):
            print(f"| {name} | {w:.2f} | {kv:.0f} | {b:.2f} | " + " | ".join(map(str, seqs)) + " | "
                  + " | ".join(map(str, node)) + " |")
    tokens = 4096   # one pair per micro-batch at --max-length 2048: chosen + rejected sequences
    print(f"\nDPO under FSDP2, {tokens} tokens per micro-batch per rank, GiB per GPU")
    for c, gpus in ((LLAMA2_70B, (8, 16, 24, 32)), (LLAMA3_8B, (8,))):
        print(f"\n{c.name} (act/token/layer {act_per_token_layer(c):,} B) | GPUs | states | transient | "
              f"activations | act. ckpt | total | total with ckpt")
        for N, s, t, a, ac, tot, totc in dpo_rows(c, gpus, tokens):
            print(f"| {N} | {s:.1f} | {t:.1f} | {a:.1f} | {ac:.1f} | {tot:.1f} | {totc:.1f} |")


if __name__ == "__main__":
    main()
