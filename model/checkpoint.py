"""Hugging Face checkpoint I/O through one explicit name table: reads `model.safetensors` or a sharded set
(`model.safetensors.index.json` + shards) into our module names (whole, or a rank's tensor-parallel slices);
writes the same layout back (sharded above a size limit) with `config.json` and the tokenizer files, so
transformers (and vLLM) load our checkpoints unchanged; `export_dtype` picks the dtype an export is written in. Errors name the file and tensor."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from selfreward.model.config import ModelConfig
from selfreward.model.llama import Transformer
from selfreward.records import DataError, user_mode


class CheckpointError(DataError):
    pass


# ours <- HF, per layer
_LAYER_TABLE = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight", "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
}


def name_table(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> HF tensor name, for exactly the tensors this config has."""
    t = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        t["output.weight"] = "lm_head.weight"
    t.update((f"layers.{i}.{ours}", f"model.layers.{i}.{hf}") for i in range(cfg.num_hidden_layers)
             for ours, hf in _LAYER_TABLE.items() if cfg.attention_bias or not ours.endswith(".bias"))
    return t


def tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {k: path / v for k, v in wm.items()}
        if missing := sorted({f.name for f in files.values() if not f.exists()}):
            raise CheckpointError(f"{index}: names shard {missing[0]}, which is missing")
        return files
    if single.exists():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(f"{path}: not a checkpoint folder (no model.safetensors or "
                          f"model.safetensors.index.json)")


def open_safetensors(f: Path):
    """safe_open, with a truncated or corrupt file reported as an error naming it."""
    try:
        return safe_open(str(f), "pt", device="cpu")
    except Exception as e:   # safetensors raises its own SafetensorError (and OSError) for a bad header
        raise CheckpointError(f"{f}: not a readable safetensors file ({e}); truncated or corrupt?") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def export_dtype(choice: str, model: str | Path) -> torch.dtype:
    """--export-dtype: a name of DTYPES, or "auto": `model`'s dtype on disk (config.json's dtype / torch_dtype,
    else its first tensor's; float32 when that is none of DTYPES)."""
    if choice != "auto":
        return DTYPES[choice]
    extra = ModelConfig.from_json(model).extra
    if (name := extra.get("dtype") or extra.get("torch_dtype")) in DTYPES:
        return DTYPES[name]
    f = next(iter(tensor_files(Path(model)).values()))
    with open_safetensors(f) as h:
        return _ST_DTYPES.get(h.get_slice(next(iter(h.keys()))).get_dtype(), torch.float32)


def read_state(path: str | Path, model: Transformer, dtype: torch.dtype = torch.float32, device="cpu",
               plan: dict[str, tuple[int, int, int]] | None = None, ignore: tuple[str, ...] = ()
               ) -> tuple[dict[str, torch.Tensor], int]:
    """`model`'s tensors (it is on the meta device: cfg and shapes) from a HF folder -> (our name -> tensor as
    dtype on device, bytes read). `plan`: our name -> (dim, start, stop), the only slice read (infer/README.md,
    "Sharded loading"). Refused, naming the file: a tokenizer whose ids run past the embedding, a missing
    tensor, a shape other than config.json's, a tensor the name table does not know (but a tied model's
    lm_head.weight, rotary inv_freq buffers and `ignore`, left to the caller: reward_model.py's score.weight)."""
    path, plan, cfg = Path(path), plan or {}, model.cfg
    tok = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).exists()), None)
    if tok is not None:
        from selfreward.model.tokenizer import Tokenizer
        if (n := Tokenizer.load(path).vocab_size) > cfg.vocab_size:
            raise CheckpointError(f"{tok}: tokenizer has {n} tokens but config.json field 'vocab_size' "
                                  f"(the embedding) has only {cfg.vocab_size}")
    files, table = tensor_files(path), name_table(cfg)
    known = set(table.values()) | set(ignore) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = [k for k in files if k not in known and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: unexpected tensor '{unexpected[0]}'"
                              f" ({len(unexpected)} in all) for model_type {cfg.model_type}")
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    state, nbytes, handles = {}, 0, {}
    for ours, hf in table.items():
        if hf not in files:
            raise CheckpointError(f"{path}: missing tensor '{hf}' (needed for {ours})")
        f = files[hf]
        handle = handles[f] = handles.get(f) or open_safetensors(f)
        try:
            sl = handle.get_slice(hf)
            shape = tuple(sl.get_shape())
            dim, a, b = plan.get(ours, (0, None, None))
            t = sl[(slice(None),) * dim + (slice(a, b),)] if shape == shapes[ours] else None
        except Exception as e:
            raise CheckpointError(f"{f}: tensor '{hf}' cannot be read ({e}); truncated or corrupt?") from None
        if t is None:
            raise CheckpointError(f"{f}: tensor '{hf}' has shape {shape}, config says {shapes[ours]}")
        nbytes += t.nbytes
        state[ours] = t.to(device=device, dtype=dtype)
    return state, nbytes


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               cfg: ModelConfig | None = None, ignore: tuple[str, ...] = ()) -> Transformer:
    """Build the model from a HF folder (config.json, or `cfg`) and load its weights (read_state)."""
    cfg = cfg or ModelConfig.from_json(path)
    model = Transformer(cfg, device="meta")
    state, _ = read_state(path, model, dtype, device, ignore=ignore)
    # assign=True swaps the loaded tensors in: no to_empty() (infer/README.md, "Design": its sympy import, a copy)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = cfg.inv_freq().to(device=device, dtype=dtype)   # cast as Module.to(dtype) did
    return model


def write_folder(out: Path, write) -> None:
    """`write(tmp)` into a temp folder beside `out`, then swap it in: a crash never leaves half a folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        user_mode(tmp, folder=True)
        write(tmp)
        for f in tmp.iterdir():   # safetensors writes its files 0600
            user_mode(f, f.is_dir())
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: Transformer | dict, cfg: ModelConfig, out: str | Path, tokenizer_dir: str | Path | None = None,
               max_shard_bytes: int = 4 * 1024**3, dtype: torch.dtype | None = None, hf_config: dict | None = None
               ) -> Path:
    """Write a HF checkpoint folder: config.json, model.safetensors (or shards + index) as `dtype` (None: as the
    tensors are), the tokenizer files of `tokenizer_dir` completed by model/tokenizer_files.py. `model` may be a module or a full (unsharded) state dict of our names;
    entries outside the name table (RL's value head) are not written, but for a reward model's score.weight.
    `hf_config`: fields over config.json's (model/reward_model.py: the sequence-classification layout)."""
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {}
    for ours, hf in dict(name_table(cfg), **({"score.weight": "score.weight"} if "score.weight" in sd else {})).items():
        if ours not in sd:
            raise CheckpointError(f"state dict has no '{ours}' (for {hf})")
        tensors[hf] = sd[ours].detach().to("cpu", dtype).contiguous()

    def write(tmp: Path):
        shards, size = [{}], 0
        for name, t in tensors.items():
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards, size = shards + [{}], 0
            shards[-1][name], size = t, size + t.nbytes
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for fname, sh in zip(names, shards):
            save_file(sh, str(tmp / fname), metadata={"format": "pt"})
        if n > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: fname for fname, sh in zip(names, shards) for k in sh}}, indent=2))
        # "dtype" as transformers 5 writes it, "torch_dtype" for readers before it (transformers 4, vLLM on it)
        name = str(next(iter(tensors.values())).dtype).replace("torch.", "")
        hf = dict(cfg.to_hf_dict(), dtype=name, torch_dtype=name, **(hf_config or {}))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer_dir is not None:
            from selfreward.model.tokenizer_files import write_tokenizer
            write_tokenizer(tokenizer_dir, tmp, hf.get("pad_token_id"))

    write_folder(Path(out), write)
    return Path(out)
