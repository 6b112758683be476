"""The data the trainers read, turned once, at the door, into the records data.py takes (train/README.md, "Data"):
where rows come from (JSONL, gzipped JSONL, parquet, a `datasets.save_to_disk` folder) and TRL's row layouts
(string or conversational; preference pairs with an explicit or an implicit prompt; prompt / completion)."""

from pathlib import Path
from typing import Iterable, Iterator

from selfreward.model.tokenizer import check_messages
from selfreward.records import DataError, check_file, field, iter_jsonl, nonempty

NEEDS_DATASETS = "needs the datasets library: pip install datasets"


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """iter_rows' rows; none: DataError."""
    return nonempty(list(iter_rows(path)), path)


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where = 'file:N', record): N the line of a JSONL file (`.gz`: gunzipped first), the row (from 1) of a
    parquet file or of a `datasets.save_to_disk` folder; a table's null cell is an absent field."""
    p = Path(path)
    if p.is_dir():
        return _saved_dataset(p)
    if p.suffix == ".parquet":
        return _parquet(check_file(p))
    return ((f"{path}:{i}", rec) for i, rec in iter_jsonl(p))


def _table(path: Path, batches: Iterable[list[dict]]) -> Iterator[tuple[str, dict]]:
    i = 0
    for batch in batches:
        for row in batch:
            i += 1
            yield f"{path}:{i}", {k: v for k, v in row.items() if v is not None}


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:   # the datasets library's own parquet reader; Dataset.from_parquet would first copy the file to its cache
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet {NEEDS_DATASETS}") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:   # pyarrow's ArrowInvalid: not parquet, cut short
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    return _table(path, (b.to_pylist() for b in f.iter_batches(batch_size=1024)))


def _saved_dataset(path: Path) -> Iterator[tuple[str, dict]]:
    if (path / "dataset_dict.json").exists():       # DatasetDict.save_to_disk: one folder per split
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}: give one split's folder"
                        + (f", e.g. {path / splits[0]}" if splits else ""))
    if not (path / "state.json").exists():
        raise DataError(f"{path}: a folder, not a file (nor a datasets.save_to_disk folder: no state.json)")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a datasets.save_to_disk folder {NEEDS_DATASETS}") from None
    ds = datasets.load_from_disk(str(path))
    return _table(path, (_rows(b) for b in ds.iter(batch_size=1024)))


def _rows(columns: dict[str, list]) -> list[dict]:
    """A datasets batch (column -> values) as rows."""
    return [dict(zip(columns, vals)) for vals in zip(*columns.values())]


def reply(v, name: str, where: str, after: str = "") -> str:
    """A reply: a string, or TRL's conversational one, [one assistant message] -> its content."""
    if isinstance(v, str):
        return v
    msgs = check_messages(v, where, name)
    if [m["role"] for m in msgs] != ["assistant"]:
        raise DataError(f"{where}: field '{name}' should be a string or one assistant message{after}, got the "
                        f"roles {[m['role'] for m in msgs]}")
    return msgs[0]["content"]


def shared_prompt(chosen: str | list, rejected: str | list) -> int:
    """TRL's `extract_prompt`: the length of the longest common prefix of two conversations (in messages) or of
    two texts (in characters; a space just before the split goes with the replies). -1 where they do not
    differ before one of them ends (no reply left to one of them)."""
    k = next((i for i in range(min(len(chosen), len(rejected))) if chosen[i] != rejected[i]), -1)
    return k - 1 if k > 0 and isinstance(chosen, str) and chosen[k - 1] == " " else k


def pair_row(rec: dict, where: str) -> dict:
    """A preference record in the native form {'prompt': str or 'messages': [..., a user turn], 'chosen': str,
    'rejected': str} (its other fields kept). TRL's layouts: a conversational 'prompt'; replies as [one assistant
    message]; an implicit prompt: no 'prompt' (or, beside conversations, a string one, as UltraFeedback's) and
    'chosen' / 'rejected' the whole texts or conversations, the prompt their longest common prefix."""
    if "chosen" not in rec or "rejected" not in rec:
        return _prompt_messages(rec, where)    # the reward model's response_1 / response_2, or an error later
    c, r = (field(rec, k, where, (str, list)) for k in ("chosen", "rejected"))
    if isinstance(c, list) != isinstance(r, list):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' should both be strings or both lists of messages")
    if isinstance(c, list):
        implicit = not isinstance(rec.get("prompt"), list) and len(c) > 1
    else:
        implicit = "prompt" not in rec and "messages" not in rec
    if not implicit:
        return dict(_prompt_messages(rec, where), chosen=reply(c, "chosen", where),
                    rejected=reply(r, "rejected", where))
    if isinstance(c, list):
        c, r = check_messages(c, where, "chosen"), check_messages(r, where, "rejected")
    k = shared_prompt(c, r)
    if k <= 0:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' (no 'prompt': the prompt is their common start) "
                        + ("share no prompt" if k == 0 else "do not differ before one of them ends"))
    rest = {key: v for key, v in rec.items() if key not in ("prompt", "messages", "chosen", "rejected")}
    if isinstance(c, str):
        return {**rest, "prompt": c[:k], "chosen": c[k:], "rejected": r[k:]}
    if c[k - 1]["role"] != "user":
        raise DataError(f"{where}: fields 'chosen' and 'rejected': their shared prompt (messages 0-{k - 1}) should "
                        f"end with a user turn, not {c[k - 1]['role']!r}")
    after = " after the prompt it shares with the other reply"
    return {**rest, "messages": c[:k], "chosen": reply(c[k:], "chosen", where, after),
            "rejected": reply(r[k:], "rejected", where, after)}


def _prompt_messages(rec: dict, where: str) -> dict:
    """A conversational 'prompt' as the native 'messages'; the replies follow it, so it ends with a user turn."""
    if not isinstance(rec.get("prompt"), list):
        return rec
    if "messages" in rec:
        raise DataError(f"{where}: fields 'prompt' (a conversation) and 'messages' both given: keep one")
    msgs = check_messages(rec["prompt"], where, "prompt")
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: field 'prompt' must end with a user turn (the replies are chosen / rejected)")
    return {**{k: v for k, v in rec.items() if k != "prompt"}, "messages": msgs}


def sft_row(rec: dict, where: str) -> dict:
    """An SFT record in the native form: TRL's 'completion' is 'response'; a conversational prompt / completion
    becomes {'messages': prompt + completion, 'prompt_turns': len(prompt)}: loss on the completion alone, as
    TRL's completion-only loss."""
    if "messages" in rec or "completion" not in rec:
        return rec
    if "response" in rec:
        raise DataError(f"{where}: fields 'completion' and 'response' both given (one is the other's alias)")
    p = field(rec, "prompt", where, (str, list))
    rest = {k: v for k, v in rec.items() if k not in ("prompt", "completion")}
    if isinstance(p, str):
        return {**rest, "prompt": p, "response": field(rec, "completion", where, str)}
    prompt = check_messages(p, where, "prompt")
    done = check_messages(field(rec, "completion", where, list), where, "completion")
    if not any(m["role"] == "assistant" for m in done):
        raise DataError(f"{where}: field 'completion' has no assistant turn to train on")
    return {**rest, "messages": prompt + done, "prompt_turns": len(prompt)}


def prompt_text(rec: dict, where: str) -> str:
    """An RL prompt: a string, or TRL's conversational prompt-only layout when it is one user turn (the rewards
    are functions of the prompt text)."""
    p = field(rec, "prompt", where, (str, list))
    if isinstance(p, str):
        return p
    msgs = check_messages(p, where, "prompt")
    if [m["role"] for m in msgs] != ["user"]:
        raise DataError(f"{where}: field 'prompt' should be a string or one user message (an RL prompt is one user "
                        f"turn), got the roles {[m['role'] for m in msgs]}")
    return msgs[0]["content"]
