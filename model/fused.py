"""The CPU inference layout of a Transformer's weights (infer/README.md, "Design": CPU weight layout; Engine
applies it, a forward with gradients on never uses it): each weight re-stored in place as the transpose of an
[in, out] contiguous tensor, q | k | v side by side in `attention.wqkv_t` [H, (nh + 2 nkv) hd], gate | up in
`feed_forward.w13_t` [H, 2I], each Parameter a view of its columns. A parameter re-assigned since no longer points
into them: the forward checks (`fused_ok`) and falls back to the separate projections. A tied LM head keeps its
layout; `lm_head_t` is a transposed copy, remade when the weight changed or was replaced.
"""

import torch
import torch.nn as nn


def _ptrs(linears: list[nn.Linear]) -> tuple[int, ...]:
    return tuple(m.weight.data_ptr() for m in linears) + tuple(m.bias.data_ptr() for m in linears if m.bias is not None)


def _side_by_side(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Weights [out_i, in] -> one [in, sum out_i] contiguous tensor; each weight becomes the transpose of
    its columns (biases likewise one [sum out_i] tensor). -> (fused weight, fused bias, data pointers)."""
    with torch.no_grad():
        # [in, sum out]; alone, torch's blocked transpose (2x faster than cat for one weight)
        wt = torch.cat([m.weight.T for m in linears], 1) if len(linears) > 1 else linears[0].weight.T.contiguous()
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])         # [sum out]
        off = 0
        for m in linears:
            o = m.weight.shape[0]
            m.weight.data = wt[:, off:off + o].T                      # [out, in] view, strides (1, sum out)
            if bias is not None:
                m.bias.data = bias[off:off + o]
            off += o
    return wt, bias, _ptrs(linears)


def fused_ok(linears: list[nn.Linear], ptrs: tuple[int, ...] | None) -> bool:
    """Do these projections still read the fused tensor (no parameter re-assigned since)?"""
    return ptrs is not None and _ptrs(linears) == ptrs


def fuse_for_inference(model) -> bool:
    """Re-store `model`'s weights in the inference layout above, in place. CPU only (on CUDA cuBLAS reads
    either layout at the same speed and this path is untested there): -> whether it was applied."""
    if model.lm_head_weight.device.type != "cpu":
        return False
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        if not fused_ok([a.wq, a.wk, a.wv], a.fused_ptrs):     # (a second Engine on the model: done)
            a.wqkv_t, a.bqkv, a.fused_ptrs = _side_by_side([a.wq, a.wk, a.wv])
        if not fused_ok([f.w1, f.w3], f.fused_ptrs):
            f.w13_t, _, f.fused_ptrs = _side_by_side([f.w1, f.w3])
    # the rest alone, transposed in place (an LM head: Transformer.logits' `h @ W.T` then reads it contiguous)
    for m in [m for layer in model.layers for m in (layer.attention.wo, layer.feed_forward.w2)] + [model.output]:
        if m is not None and not m.weight.T.is_contiguous():
            _side_by_side([m])
    model.lm_head_t_src = None              # a tied head's copy is made on first use (tied_head_t)
    model.fused = True
    return True


def tied_head_t(model) -> torch.Tensor | None:
    """The tied LM head's transposed copy [H, V], remade if the embedding weight changed or was replaced;
    None when the model is not in the inference layout or not tied."""
    if not getattr(model, "fused", False) or model.output is not None:
        return None
    w = model.tok_embeddings.weight
    key = (id(w), w.data_ptr(), w._version)
    if model.lm_head_t_src != key:
        with torch.no_grad():
            model.lm_head_t = w.T.contiguous()
        model.lm_head_t_src = key
    return model.lm_head_t
