"""Training data: readers, chat rendering, truncation, packing, pair batches, the batch order (train/README.md,
"Data": the record formats and the truncation rules)."""

import dataclasses
import random
from dataclasses import dataclass

import torch

from selfreward.kernels.logprobs import IGNORE_INDEX as IGNORE
from selfreward.model.tokenizer import check_messages
from selfreward.records import DataError, field
from selfreward.train.layouts import pair_row, read_rows, sft_row


@dataclass
class Example:
    ids: list[int]     # the whole rendered sequence, BOS first
    mask: list[bool]   # mask[i]: token i is a training target (predicted from tokens < i)


def sft_example(rec: dict, tok, where: str, system: str | None = None) -> Example:
    """A native SFT record (layouts.sft_row's) -> its example."""
    context = 0                     # the first `prompt_turns` messages: no loss on them
    if "messages" in rec:
        msgs = check_messages(rec["messages"], where)
        if "prompt_turns" in rec:
            context = field(rec, "prompt_turns", where, int)
            if not 0 <= context < len(msgs):
                raise DataError(f"{where}: field 'prompt_turns' should be in [0, {len(msgs)}), got {context}")
    elif "prompt" in rec or "response" in rec:
        msgs = [{"role": "user", "content": field(rec, "prompt", where, str)},
                {"role": "assistant", "content": field(rec, "response", where, str)}]
    elif "text" in rec:
        ids = [tok.bos_id] + tok.encode(field(rec, "text", where, str)) + [tok.eos_id]
        return Example(ids, [False] + [True] * (len(ids) - 1))
    else:
        raise DataError(f"{where}: needs field 'messages', 'prompt'+'response' or 'text'")
    if not any(m["role"] == "assistant" for m in msgs[context:]):
        raise DataError(f"{where}: field 'messages' has no assistant turn to train on")
    if system is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
        context += 1 if context else 0      # the system turn joins the context
    ids, mask = tok.render_chat(msgs)
    n = len(tok.render_chat(msgs[:context])[0]) if context else 0   # turns render as growing prefixes
    return Example(list(ids), [False] * n + [bool(m) for m in mask[n:]])


def load_sft(paths: list[str], tok, max_length: int, systems: dict[str, str] | None = None
             ) -> tuple[list[Example], dict]:
    """-> (examples, counts {read, truncated, dropped})."""
    out, counts = [], {"read": 0, "truncated": 0, "dropped": 0}
    for p in paths:
        for where, rec in read_rows(p):
            ex = sft_example(sft_row(rec, where), tok, where, (systems or {}).get(p))
            counts["read"] += 1
            if len(ex.ids) > max_length:
                counts["truncated"] += 1
                ex = Example(ex.ids[:max_length], ex.mask[:max_length])
            if not any(ex.mask[1:]):
                counts["dropped"] += 1
                continue
            out.append(ex)
    return out, counts


def pack_rows(examples: list[Example], row_len: int, pad_id: int, packing: bool = True
              ) -> dict[str, torch.Tensor]:
    """-> input_ids, targets, positions [B, T]: each example's ids[:-1] as inputs, ids[1:] as targets (IGNORE
    where not a target), positions from 0 per example (and per padding), so attention stays inside it; rows of
    row_len filled first-fit in order, or (packing=False) one example per row, padded to the longest."""
    segs = [(ex.ids[:-1], [t if m else IGNORE for t, m in zip(ex.ids[1:], ex.mask[1:])]) for ex in examples]
    rows: list[list[tuple]] = []
    fill: list[int] = []
    for seg in segs:
        r = next((r for r, used in enumerate(fill) if used + len(seg[0]) <= row_len), None) if packing else None
        if r is None:
            r = len(rows)
            rows.append([])
            fill.append(0)
        rows[r].append(seg)
        fill[r] += len(seg[0])
    T = row_len if packing else max(fill)
    out: dict[str, list] = {"input_ids": [], "targets": [], "positions": []}
    for row, n in zip(rows, fill):
        out["input_ids"].append([x for inp, _ in row for x in inp] + [pad_id] * (T - n))
        out["targets"].append([x for _, tgt in row for x in tgt] + [IGNORE] * (T - n))
        out["positions"].append([p for inp, _ in row for p in range(len(inp))] + list(range(T - n)))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


@dataclass
class Pair:
    prompt: list[int]     # chat-rendered with the generation prompt, BOS first
    chosen: list[int]     # response ids + EOS
    rejected: list[int]
    p1: float = 1.0       # P(chosen is better): 1 for DPO's pairs, the label for the reward model's


def dpo_pair(rec: dict, tok, where: str) -> Pair:
    if "messages" in rec:
        msgs = check_messages(rec["messages"], where)
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{where}: field 'messages' must end with a user turn (the reply is chosen/rejected)")
    elif "prompt" in rec:
        msgs = [{"role": "user", "content": field(rec, "prompt", where, str)}]
    else:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages')")
    if "prompt_token_ids" in rec:
        prompt = _ids_field(rec, "prompt_token_ids", where, tok)
    else:
        prompt, _ = tok.render_chat(msgs, add_generation_prompt=True)
    # a reply is laid as render_chat lays it after the generation prompt: content + the end-of-turn token(s)
    end = tok.render_response("")
    resp = [_ids_field(rec, f"{k}_token_ids", where, tok) + end if f"{k}_token_ids" in rec
            else tok.render_response(field(rec, k, where, str)) for k in ("chosen", "rejected")]
    return Pair(list(prompt), resp[0], resp[1])


def _ids_field(rec: dict, name: str, where: str, tok) -> list[int]:
    v = rec[name]
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size
                                          for t in v):
        raise DataError(f"{where}: field '{name}' must be a list of token ids in [0, {tok.vocab_size})")
    return list(v)


def truncate_pair(p: Pair, max_length: int, max_prompt_length: int) -> tuple[Pair, bool]:
    prompt = p.prompt if len(p.prompt) <= max_prompt_length else \
        p.prompt[:1] + p.prompt[len(p.prompt) - (max_prompt_length - 1):]
    room = max_length - len(prompt)
    q = Pair(prompt, p.chosen[:room], p.rejected[:room], p.p1)
    cut = len(prompt) < len(p.prompt) or len(q.chosen) < len(p.chosen) or len(q.rejected) < len(p.rejected)
    return q, cut


def load_pairs(paths: list[str], tok, max_length: int, max_prompt_length: int, label=None
               ) -> tuple[list[Pair], dict]:
    """-> (pairs, counts {read, truncated}). `label(rec, where)` -> (the record with chosen / rejected, p1)."""
    out, counts = [], {"read": 0, "truncated": 0}
    for path in paths:
        for where, rec in read_rows(path):
            rec = pair_row(rec, where)
            rec, p1 = label(rec, where) if label else (rec, 1.0)
            q, cut = truncate_pair(dpo_pair(rec, tok, where), max_length, max_prompt_length)
            counts["read"] += 1
            counts["truncated"] += int(cut)
            out.append(dataclasses.replace(q, p1=p1))
    return out, counts


def split_data(cfg, load) -> tuple[list, list, dict]:
    """-> (training examples, held-out ones: --eval-data or --eval-fraction, the counts of --data);
    `load(paths)` -> (examples, counts)."""
    train, counts = load(cfg.data)
    if cfg.eval_data:
        return train, load(cfg.eval_data)[0], counts
    if cfg.eval_fraction > 0:
        return *split_held_out(train, cfg.eval_fraction, cfg.seed), counts
    return train, [], counts


@dataclass
class FlatBatch:
    """Sequences laid end to end for ONE forward, one output (a summed response log-prob) per (prompt,
    response) given to flat_batch; pair_batch's 2B outputs are the chosen ones (0..B-1), then the rejected."""
    tokens: torch.Tensor       # [N] the sequences' input ids, end to end
    positions: torch.Tensor    # [N]
    targets: torch.Tensor      # [N] the next token on response positions, IGNORE elsewhere
    seq_id: torch.Tensor       # [N] which of the S sequences a token belongs to
    cu_seqlens: torch.Tensor   # [S+1] int32
    max_seqlen: int
    resp_len: torch.Tensor     # [O] response tokens (targets) per output
    out_seq: torch.Tensor      # [O] the sequence whose summed log-prob each output is
    prefix: torch.Tensor | None = None   # [S, 2] int32 (start, length) of each sequence's prefix; None: none


def flat_batch(outs: list[tuple[list[int], list[int]]], share_prompt: bool = False) -> FlatBatch:
    """Unshared: one sequence per (prompt, response), prompt + response[:-1]. Shared: each distinct prompt once,
    its replies attending to it as their prefix (train/README.md, "Shared-prompt DPO and selective checkpointing")."""
    toks, pos, tgt, sid, lens, pre = [], [], [], [], [], []

    def add(inp: list[int], p0: int, t: list[int], prefix: tuple[int, int]) -> int:
        pre.append(prefix)
        toks.extend(inp)
        pos.extend(range(p0, p0 + len(inp)))
        tgt.extend(t)
        sid.extend([len(lens)] * len(inp))
        lens.append(len(inp))
        return len(lens) - 1

    if not share_prompt:
        out_seq = [add((pr + rs)[:-1], 0, [IGNORE] * (len(pr) - 1) + rs, (0, 0)) for pr, rs in outs]
    else:
        groups: dict[tuple, dict] = {}      # prompt -> {response: sequence}; insertion order = layout order
        for pr, rs in outs:
            groups.setdefault(tuple(pr), {}).setdefault(tuple(rs), None)
        seq_of = {}
        for pr, resps in groups.items():
            prefix = (0, 0)
            if len(pr) > 1:   # the prompt minus its last token, once
                prefix = (len(toks), len(pr) - 1)
                add(list(pr[:-1]), 0, [IGNORE] * (len(pr) - 1), (0, 0))
            for rs in resps:
                seq_of[pr, rs] = add([pr[-1]] + list(rs[:-1]), len(pr) - 1, list(rs), prefix)
        out_seq = [seq_of[tuple(pr), tuple(rs)] for pr, rs in outs]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    prefix = torch.tensor(pre, dtype=torch.int32) if share_prompt else None
    return FlatBatch(torch.tensor(toks), torch.tensor(pos), torch.tensor(tgt), torch.tensor(sid), cu,
                     max(lens), torch.tensor([len(rs) for _, rs in outs]), torch.tensor(out_seq), prefix)


def pair_batch(pairs: list[Pair], share_prompt: bool = True) -> FlatBatch:
    return flat_batch([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs], share_prompt)


def split_held_out(data: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a share `fraction` (at least one) of `data` held out, drawn by `seed`; the
    training examples keep their order."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    k = max(1, int(len(data) * fraction))
    return [data[i] for i in sorted(order[k:])], [data[i] for i in order[:k]]


def global_batch(n: int, batch: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the global batch at `step` (0-based). An epoch's order is a function of (seed, epoch) only,
    so a resumed run sees the same; epochs drop their incomplete last batch."""
    if n < batch:
        raise DataError(f"{n} examples are fewer than one global batch of {batch}")
    epoch, k = divmod(step, n // batch)
    idx = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx[k * batch:(k + 1) * batch]


def rank_micro_batches(batch: list, world: int, rank: int, micro: int) -> list[list]:
    """Rank r's (the r-th contiguous slice of the batch) micro-batches."""
    per_rank = len(batch) // world
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro] for i in range(0, per_rank, micro)]
