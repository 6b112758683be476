"""ModelConfig: the Llama-family architecture read from a Hugging Face `config.json`: model_type llama
(Llama 2, Llama 3/3.1 with `llama3` rope scaling), mistral, qwen2 (bias on q/k/v). Anything we would compute
differently from transformers is refused with a message naming the file and field, never mis-computed."""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from selfreward.ranges import ConfigError
from selfreward.records import read_json

ARCH = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}   # model_type -> transformers' class prefix
LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # None, or {"rope_type": "llama3", factor, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False              # bias on q/k/v (qwen2 always)
    sliding_window: int | None = None         # mistral; sequences longer than this are refused
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    dropout: float = 0.0                      # residual-branch dropout, set by the trainers (papers: 0.1)
    extra: dict = field(default_factory=dict, repr=False)  # the rest of config.json, kept for export

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True
        assert self.num_attention_heads % self.num_key_value_heads == 0, "heads must be a multiple of kv heads"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2], fp32, with llama3 scaling applied where configured."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        rs = self.rope_scaling
        if rs and rs.get("rope_type") == "llama3":
            factor, lo, hi, old = (rs[k] for k in LLAMA3)
            wavelen = 2 * math.pi / inv
            # long wavelengths are slowed by `factor`, short ones kept, the band between blended
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            inv = torch.where((wavelen >= old / hi) & (wavelen <= old / lo), blended, scaled)
        return inv

    @classmethod
    def from_json(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not Path(folder).is_dir():
            raise ConfigError(f"{folder}: not a folder")
        if not path.exists():
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)")
        raw = read_json(path, error=ConfigError)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        def bad(fld, why):
            raise ConfigError(f"{source}: field '{fld}': {why}")

        mt, heads = raw.get("model_type"), raw.get("num_attention_heads")
        if mt not in ARCH:
            bad("model_type", f"{mt!r} is not supported (supported: {', '.join(ARCH)})")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(raw.get(k), int) or raw[k] <= 0:
                bad(k, f"missing or not a positive integer ({raw.get(k)!r})")
        mpe = raw.get("max_position_embeddings", 2048)
        if not isinstance(mpe, int) or isinstance(mpe, bool) or mpe < 2:
            bad("max_position_embeddings", f"{mpe!r} must be an integer >= 2")
        kv = raw.get("num_key_value_heads", heads)
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            bad("num_key_value_heads", f"{kv!r} must be a positive divisor of num_attention_heads ({heads})")
        hd = raw.get("head_dim")
        if hd is not None and (not isinstance(hd, int) or hd <= 0 or hd % 2):
            bad("head_dim", f"{hd!r} must be a positive even integer (RoPE rotates pairs)")
        if raw.get("hidden_act", "silu") != "silu":
            bad("hidden_act", f"{raw['hidden_act']!r} is not supported (only silu)")
        if raw.get("mlp_bias"):
            bad("mlp_bias", "MLP biases are not supported")
        if raw.get("pretraining_tp", 1) != 1:
            bad("pretraining_tp", "only 1 is supported")
        if mt == "qwen2" and raw.get("use_sliding_window"):
            bad("use_sliding_window", "sliding-window attention is not supported for qwen2")
        # transformers 5 writes rope_parameters (with rope_theta inside); older versions rope_scaling
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "llama3"):
            bad("rope_scaling", f"rope_type {rtype!r} is not supported (supported: default, llama3)")
        if rtype == "llama3" and (k := next((k for k in LLAMA3 if k not in rope), None)):
            bad("rope_scaling", f"llama3 scaling needs '{k}'")
        known = set(cls.__dataclass_fields__) | {"rope_parameters", "rope_theta", "rope_scaling"}
        return cls(
            model_type=mt, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads"),
            head_dim=hd, rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling={"rope_type": "llama3", **{k: rope[k] for k in LLAMA3}} if rtype == "llama3" else None,
            max_position_embeddings=mpe, tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=mt == "llama" and bool(raw.get("attention_bias")),   # qwen2: always (__post_init__)
            sliding_window=raw.get("sliding_window") if mt == "mistral" else None,
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_hf_dict(self) -> dict:
        """config.json contents that transformers reads back to the same architecture."""
        d = dict(self.extra, **{k: v for k, v in asdict(self).items()
                                if k not in ("extra", "dropout", "rope_scaling", "sliding_window")})
        d.update(architectures=[ARCH[self.model_type] + "ForCausalLM"], hidden_act="silu")
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d.pop("attention_bias", None)
        return d
