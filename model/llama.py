"""The Llama-family transformer, single-device. Parallelism (FSDP2, activation checkpointing) is applied
from outside (train/parallel.py); math goes through the `kernels` switch.

Every forward works on a flat token axis: N tokens from S sequences laid end to end, delimited by
`cu_seqlens`. A padded batch, a packed training row and a paged inference step are all this one shape.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

import selfreward.kernels.ops as K
from selfreward.model.config import ModelConfig
from selfreward.model.dropout import dropout
from selfreward.model.fused import fused_ok, tied_head_t


@dataclass
class AttnContext:
    """What attention needs besides q, k, v. Training / full forward: cu_seqlens only.
    Paged inference (built by infer/runner.py): the KV caches and where this step's tokens go."""
    cu_seqlens: torch.Tensor                 # [S+1] int32, over this call's tokens
    max_seqlen: int
    kv_caches: list | None = None            # per layer (k_cache, v_cache): [blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor | None = None  # [N] cache slot of each new token (-1: don't store)
    block_tables: torch.Tensor | None = None  # [S, max_blocks]
    context_lens: torch.Tensor | None = None  # [S] cached + new tokens per sequence
    decode: bool = False                     # every sequence has exactly one new token
    prefix: torch.Tensor | None = None       # [S, 2] int32 (start, length): keys seen in full first (shared-prompt DPO)
    shared_blocks: int = 0                   # decode: leading blocks every sequence shares (kernels/paged.py)


def context_from_positions(positions: torch.Tensor) -> tuple[torch.Tensor, AttnContext]:
    """positions: [B, T] that restart at 0 where a new example begins (packing) -> flat positions [B*T],
    and a context whose sequences are the examples. Each row also starts a new sequence."""
    B, T = positions.shape
    flat = positions.reshape(-1)
    starts = flat == 0
    starts[::T] = True
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    return flat, AttnContext(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, b = cfg.hidden_size, cfg.attention_bias
        self.wq = nn.Linear(H, self.nh * self.hd, bias=b, device=device)
        self.wk = nn.Linear(H, self.nkv * self.hd, bias=b, device=device)
        self.wv = nn.Linear(H, self.nkv * self.hd, bias=b, device=device)
        self.wo = nn.Linear(self.nh * self.hd, H, bias=False, device=device)
        self.wqkv_t = self.bqkv = self.fused_ptrs = None   # the inference layout (model/fused.py)

    def forward(self, x, cos, sin, ctx: AttnContext, rows=None):
        """rows: [n] the rows whose output is wanted (None: all); every row's key and value is still made,
        other rows' queries are zeros (their outputs are dropped) -> [n or N, H]."""
        N = x.shape[0]
        if rows is None and not torch.is_grad_enabled() and fused_ok([self.wq, self.wk, self.wv], self.fused_ptrs):
            # inference layout: q | k | v from one matmul, rope over the q and k heads in one call
            qkv = x @ self.wqkv_t if self.bqkv is None else torch.addmm(self.bqkv, x, self.wqkv_t)  # [N, (nh+2nkv)*hd]
            nqk = self.nh + self.nkv
            qk = K.rope(qkv[:, :nqk * self.hd].view(N, nqk, self.hd), cos, sin)   # [N, nh + nkv, hd]
            q, k = qk[:, :self.nh], qk[:, self.nh:]
            v = qkv[:, nqk * self.hd:].view(N, self.nkv, self.hd)
        else:
            if rows is None:
                q = K.rope(self.wq(x).view(N, self.nh, self.hd), cos, sin)    # [N, nh, hd]
            else:
                qr = K.rope(self.wq(x[rows]).view(-1, self.nh, self.hd), cos[rows], sin[rows])
                q = qr.new_zeros(N, self.nh, self.hd).index_put((rows,), qr)   # qr's dtype (bf16 under autocast)
            k = K.rope(self.wk(x).view(N, self.nkv, self.hd), cos, sin)   # [N, nkv, hd]
            v = self.wv(x).view(N, self.nkv, self.hd)
        if ctx.kv_caches is None:
            o = K.attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, prefix=ctx.prefix)
        else:
            k_cache, v_cache = ctx.kv_caches[self.layer_idx]
            K.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
            if ctx.decode:
                o = K.paged_decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens,
                                   shared=ctx.shared_blocks)
            else:
                o = K.paged_prefill(q, k_cache, v_cache, ctx.cu_seqlens, ctx.block_tables, ctx.context_lens)
        if rows is not None:
            o = o[rows]
        return self.wo(o.reshape(-1, self.nh * self.hd))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Linear(H, I, bias=False, device=device)  # gate
        self.w3 = nn.Linear(H, I, bias=False, device=device)  # up
        self.w2 = nn.Linear(I, H, bias=False, device=device)  # down
        self.w13_t = self.fused_ptrs = None                    # the inference layout (model/fused.py)

    def forward(self, x):
        if not torch.is_grad_enabled() and fused_ok([self.w1, self.w3], self.fused_ptrs):
            gu = x @ self.w13_t                              # [N, 2I]: gate | up in one matmul
            I = gu.shape[1] // 2
            return self.w2(K.swiglu(gu[..., :I], gu[..., I:]))
        return self.w2(K.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None):
        super().__init__()
        self.attention_norm = nn.Parameter(torch.ones(cfg.hidden_size, device=device))
        self.attention = Attention(cfg, layer_idx, device)
        self.ffn_norm = nn.Parameter(torch.ones(cfg.hidden_size, device=device))
        self.feed_forward = FeedForward(cfg, device)
        self.cfg = cfg   # shared with the Transformer: setting model.cfg.dropout reaches every block

    def forward(self, x, cos, sin, ctx, rows=None):
        """rows: [n] keep only these rows' outputs (Transformer.forward's out_rows) -> [n or N, H]."""
        eps, p = self.cfg.rms_norm_eps, self.cfg.dropout
        h = self.attention(K.rmsnorm(x, self.attention_norm, eps), cos, sin, ctx, rows)
        x = (x if rows is None else x[rows]) + dropout(h, p, self.training)
        h = self.feed_forward(K.rmsnorm(x, self.ffn_norm, eps))
        return x + dropout(h, p, self.training)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        """device="meta": shapes only, for a loader to fill; passed to each layer (no `with torch.device` block)
        and the embedding given an empty weight, as random inits on meta import torch._dynamo (seconds)."""
        super().__init__()
        self.cfg = cfg
        w = torch.empty(cfg.vocab_size, cfg.hidden_size, device=device) if str(device) == "meta" else None
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=w, device=device)
        self.layers = nn.ModuleList(Block(cfg, i, device) for i in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size, device=device))
        self.output = None if cfg.tie_word_embeddings else \
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:  # [V, H]
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Fresh random weights (for models trained from scratch, e.g. the embedded world's M0)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():   # biases 0, norms 1, matrices N(0, std)
                p.copy_(torch.zeros(p.shape) if "bias" in name else torch.ones(p.shape) if p.dim() == 1
                        else torch.randn(p.shape, generator=g) * std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: AttnContext,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: [N] -> final-norm hidden states [N, H] (for .logits() or kernels.linear_logprobs).
        out_rows: [n] the rows whose hidden state is wanted (the loss's target rows) -> [n, H]: the last block
        makes only keys and values for the others (all that later rows need) and runs its queries, attention
        output and feed-forward on these rows alone (DPO's prompt rows: no work there)."""
        if self.cfg.sliding_window is not None and ctx.max_seqlen > self.cfg.sliding_window and ctx.kv_caches is None:
            raise ValueError(f"sequence of {ctx.max_seqlen} tokens exceeds sliding_window "
                             f"{self.cfg.sliding_window}, which this model does not implement")
        cos, sin = K.rope_cos_sin(self.inv_freq, positions)       # [N, hd/2] each
        x = dropout(self.tok_embeddings(tokens), self.cfg.dropout, self.training)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, ctx, out_rows if i == len(self.layers) - 1 else None)
        return K.rmsnorm(x, self.norm, self.cfg.rms_norm_eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        wt = tied_head_t(self) if not torch.is_grad_enabled() else None   # [H, V] (model/fused.py)
        return (h @ (self.lm_head_weight.T if wt is None else wt)).float()   # [N, V]

    def forward_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids: [B, T], positions restarting at 0 per packed example -> hidden [B, T, H]."""
        B, T = input_ids.shape
        pos, ctx = context_from_positions(position_ids)
        return self(input_ids.reshape(-1), pos, ctx).view(B, T, -1)

    def forward_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A padded batch (left or right padding), as transformers takes it -> logits [B, T, V] (fp32).
        Padding positions' logits are zeros."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = (mask.long().cumsum(1) - 1)[mask]                     # [N] positions of real tokens
        h = self.forward_packed(input_ids[mask][None], pos[None])[0]   # the rows laid end to end
        out = torch.zeros(*input_ids.shape, self.cfg.vocab_size, device=h.device)
        out[mask] = self.logits(h)
        return out
