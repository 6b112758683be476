"""The door every number passes: one table of ranges by the last part of a setting's name (the flag's too),
checked for flags and `--config` files alike (cli.from_dict, cli.Parser: every parser, hand-written ones too),
before any model loads; every float must also be finite. Settings with a meaning of their own keep their extra
rules in their config's check(). docs/flags.md lists every entry point's flags.
"""

import dataclasses
import math

from selfreward.records import DataError


class ConfigError(DataError):
    """A bad flag or config value: the message names the flag."""


_RULES = {  # a range -> the settings (the last part of their names) it holds for; "any": any number
    ">=0": "temperature top_k final_lr weight_decay beta threads num_blocks micro_batch_size epochs max_steps every "
           "max_prompt_length grad_clip nll_alpha value_coef simpo_gamma sleep_per_step margin limit judge_self_train "
           "eft_mix steps shots words segments groups n_control n_eft n_eval n_ift n_judge n_pass n_pref n_prompts "
           "n_unlabelled web_docs self_instruct node_rank",
    ">=1": "max_tokens max_new_tokens num_samples n_candidates judge_k nproc n chunk block_size max_num_seqs "
           "max_num_batched_tokens tensor_parallel batch_size batch log_every keep_checkpoints curate_k iterations "
           "iter rounds draws shingle context ffn heads hidden layers vocab tries repeat nnodes timeout",
    ">0": "lr scale", ">=2": "max_length", ">=-1": "warmup_steps", "(0,1]": "top_p",
    "[0,1]": "near_dup rouge_threshold frac p_right p_judge min_p",
    "[0,1)": "fraction eval_frac beta1 beta2 dropout",
    "[0,0.5)": "label_smoothing", "any": "seed",
}


def _parse(rule: str) -> tuple:
    """">=0", ">0", "[0,1)", "any", ... -> (low, high, low open, high open); None = unbounded."""
    num = lambda x: float(x) if "." in x else int(x)   # noqa: E731
    if rule == "any":
        return None, None, False, False
    if rule[0] == ">":
        return num(rule.lstrip(">=")), None, rule[1] != "=", False
    lo, hi = rule[1:-1].split(",")
    return num(lo), num(hi), rule[0] == "(", rule[-1] == ")"


RANGES = {name: _parse(rule) for rule, names in _RULES.items() for name in names.split()}


def range_suffix(name: str) -> str | None:
    """The longest key of RANGES that the setting `name` is, or ends with after a "_"."""
    return max((s for s in RANGES if name == s or name.endswith("_" + s)), key=len, default=None)


def check_number(flag: str, v, choices: tuple | None = None) -> None:
    """`flag`'s value: one of `choices` where the setting has them (cli.choice); a number (a list: each one) finite
    and inside RANGES' rule for its name; else a ConfigError."""
    if choices and v not in choices:
        raise ConfigError(f"{flag} {v!r}: choose one of {', '.join(choices)}")
    if isinstance(v, (list, tuple)):
        for x in v:
            check_number(flag, x)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if not math.isfinite(v):
        raise ConfigError(f"{flag} {v}: must be a finite number")
    rule = RANGES.get(range_suffix(flag.lstrip("-").replace("-", "_")))
    if rule:
        lo, hi, lo_open, hi_open = rule
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
            want = f"be {'>' if lo_open else '>='} {lo}" if hi is None else \
                f"lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ConfigError(f"{flag} {v:g}: must {want}")


def check_fields(cfg) -> None:
    """The door for a config built in Python (flags and files go through cli.from_dict): its own fields."""
    for f in dataclasses.fields(cfg):
        check_number("--" + f.name.replace("_", "-"), getattr(cfg, f.name), f.metadata.get("choices"))

