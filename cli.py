"""Config dataclasses <-> flags and JSON, the torchrun launcher, and the entry scripts' error handling.

One convention everywhere: field `some_name` is `--some-name`; a nested config's fields carry its name,
`LoopConfig.judge.k` is `--judge-k`; bools take `--x/--no-x`; list fields take several values. Every entry
takes `--config FILE [KEY=VALUE ...]` (JSON, e.g. the RUN/config.json a command wrote, or YAML; then overrides
of its settings, `judge.k=5`: config_files.py): the file's values first, the overrides, flags over them;
`to_dict` / `from_dict` round-trip a config exactly. A field's help is the `# comment` after it.
"""

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path

from selfreward import config_files
from selfreward.ranges import ConfigError, check_number
from selfreward.records import DataError, write_json


def _flag_type(t):
    """int, float, str, bool, list[...] or a dataclass for a field annotation; None: the field has no flag."""
    if dataclasses.is_dataclass(t) or t in (int, float, str, bool) or typing.get_origin(t) is list:
        return t
    if typing.get_origin(t) in (typing.Union, types.UnionType):   # `str | Callable`: str; `int | None`: int
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return str if str in args else (args[0] if len(args) == 1 and args[0] in (int, float) else None)
    return None


def _comments(cls) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        if dataclasses.is_dataclass(c):
            out.update((m.group(1), m.group(2).replace("%", "%%"))
                       for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(c), re.M))
    return out


def outer_defaults(f: dataclasses.Field) -> dict:
    """A nested config field's own settings: those its default sets apart from its class's defaults (recipes/
    humpback.py's SFT is not train/sft.py's). A flag or a config file that gives some of the nested settings
    keeps the rest of these; a setting a class fills in itself (DPO's beta, by loss) is not one of them."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    mine = f.default_factory()
    plain = type(mine)()
    return {g.name: getattr(mine, g.name) for g in dataclasses.fields(mine)
            if getattr(mine, g.name) != getattr(plain, g.name)}


def add_flags(p: argparse.ArgumentParser, cls, prefix: str = "", skip: dict | None = None,
              over: dict | None = None) -> set[str]:
    """Flags for the fields of `cls` and of its nested configs (default None: not given) -> their dests.
    `skip` maps "" or a nested field's name to the fields that get no flag (the caller sets them); `over`: the
    defaults the outer config sets for this nested one (outer_defaults), shown in the help."""
    skip, helps, hints, dests = skip or {}, _comments(cls), typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        t, name = _flag_type(hints[f.name]), prefix + f.name
        if t is None or f.name in skip.get("", ()):
            continue
        if dataclasses.is_dataclass(t):
            dests |= add_flags(p, t, name + ".", {"": skip.get(f.name, ())}, outer_defaults(f))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (over or {}).get(f.name, default)
        kw = dict(dest=name, default=None, help=f"{helps.get(f.name, '')} (default: {default!r})".strip())
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(nargs="+", type=typing.get_args(t)[0]) if typing.get_origin(t) is list else kw.update(type=t)
            kw["metavar"] = f.name.upper()
        p.add_argument("--" + name.replace(".", "-").replace("_", "-"), **kw)
        dests.add(name)
    return dests


# Field metadata (provenance.made_by and cli.shaping read it): PASSIVE, the setting does not change what a run
# makes (where it writes, how often it logs or saves, batching, threads), so a rerun or --resume may change it;
# checkpoint() / input_file(): a folder / file (or a list) that shapes the data by its content, not its path.
# Every other field shapes the data as it is.
PASSIVE = {"shapes": False}


def passive(default, metadata: dict = PASSIVE):
    """`x: int = cli.passive(0)`: a dataclass field marked PASSIVE (or with `metadata`)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def choice(default: str, *others: str, shapes: bool = True):
    """A setting with named values, `default` first: anything else is refused at the door (ranges.check_number);
    shapes=False: PASSIVE too."""
    return dataclasses.field(default=default, metadata={"choices": (default, *others), **({} if shapes else PASSIVE)})


def checkpoint(default=""):
    return passive(default, {"shapes": "model"})


def input_file(default=""):
    return passive(default, {"shapes": "file"})


def shaping(cls, d: dict) -> dict:
    """`d` (plain data of class `cls`: to_dict's, or a saved config.json) without the PASSIVE fields."""
    if not (dataclasses.is_dataclass(cls) and isinstance(d, dict)):
        return d
    hints = typing.get_type_hints(cls)
    return {f.name: shaping(hints[f.name], d[f.name]) for f in dataclasses.fields(cls)
            if f.name in d and f.metadata.get("shapes", True)}


def to_dict(cfg) -> dict:
    """The config as nested plain data; callables are left out (they cannot be saved)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif not callable(v):
            out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
    return out


_KINDS = {int: (int, float), float: (int, float), bool: (bool,), str: (str,)}   # what a file's value may be
_KIND_NAMES = {int: "a number", float: "a number", bool: "true or false", str: "text"}


def _plain(t):
    """int, float, bool or str for a field of that type (or `| None`); else None (`str | Callable`: unchecked)."""
    args = [a for a in typing.get_args(t) if a is not type(None)] \
        if typing.get_origin(t) in (typing.Union, types.UnionType) else [t]
    return args[0] if len(args) == 1 and args[0] in _KINDS else None


def from_dict(cls, d: dict, where: str = "config", prefix: str = "", over: dict | None = None):
    """`cls` filled from nested data over `over` (outer_defaults'): an unknown key is an error, every number goes
    through check_number."""
    hints, fields, kw = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}, dict(over or {})
    for k, v in d.items():
        if k not in fields:
            raise ConfigError(f"{where}: unknown field '{k}' for {cls.__name__}{config_files.close(k, fields)}")
        t, kind = _flag_type(hints[k]), _plain(hints[k])
        if kind and v is not None and (not isinstance(v, _KINDS[kind]) or isinstance(v, bool) != (kind is bool)):
            raise ConfigError(f"{where}: field '{k}': {v!r} is not {_KIND_NAMES[kind]}")
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, f"{where}.{k}", f"{prefix}{k}.", outer_defaults(fields[k]))
        elif typing.get_origin(hints[k]) is tuple and isinstance(v, list):
            v = tuple(v)                      # JSON has no tuples: a tuple field reloads as one
        flag = "--" + (prefix + k).replace(".", "-").replace("_", "-")
        check_number(flag, v, fields[k].metadata.get("choices"))
        kw[k] = v
    return cls(**kw)


class Parser(argparse.ArgumentParser):
    """Every number it parses (lists too) goes through check_number: cli.parser's and the hand-written ones.
    Flags may come with underscores (`--max_steps`), TRL's names are refused with ours, --config's KEY=VALUE
    overrides are read as their flags, an unknown flag is answered with the nearest (config_files.py)."""
    def parse_known_args(self, args=None, namespace=None):
        args = config_files.respell(sys.argv[1:] if args is None else list(args), self._option_string_actions)
        ns, rest = super().parse_known_args(args, namespace)
        if isinstance(getattr(ns, "config", None), list):
            config_files.overrides(ns, self._option_string_actions, getattr(ns, "_cfg_dests", []))
        for dest, v in vars(ns).items():
            if not dest.startswith("_"):
                check_number("--" + dest.replace(".", "-").replace("_", "-"), v)
        return ns, rest

    def parse_args(self, args=None, namespace=None):
        ns, rest = self.parse_known_args(args, namespace)
        if rest:
            self.error(config_files.unknown(rest, self._option_string_actions))
        return ns


def parser(cls, description: str = "", skip: dict | None = None, own: tuple[str, ...] = ()
           ) -> argparse.ArgumentParser:
    """--config and a flag per field of `cls` (but `skip`'s, as add_flags). `own`: top-level fields whose flags the
    caller adds itself (dest: the field's name; e.g. an alias, action="append"), read by build() like the rest."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", metavar=("FILE", "KEY=VALUE"),
                   help="a JSON or YAML config (e.g. the RUN/config.json a command wrote), then overrides of its "
                   "settings by their dotted names (lr=1e-5 engine.dtype=bfloat16; a list: a,b); flags override both")
    skip = {**(skip or {}), "": {*(skip or {}).get("", ()), *own}}
    p.set_defaults(_cfg_dests=sorted(add_flags(p, cls, skip=skip)) + list(own))
    return p


def build(cls, ns: argparse.Namespace):
    """The config from `--config` (if given) with every config flag that was given over it."""
    base = config_files.load(ns.config) if getattr(ns, "config", None) else {}
    for k in ns._cfg_dests:
        if getattr(ns, k) is not None:
            *head, last = k.split(".")
            d = base
            for h in head:
                d = d.setdefault(h, {})
            d[last] = getattr(ns, k)
    return from_dict(cls, base, getattr(ns, "config", None) or "flags")


def parse_config(cls, argv: list[str] | None, description: str = ""):
    """`argv` -> a filled, checked `cls` (the trainers' entry)."""
    cfg = build(cls, parser(cls, description).parse_args(argv))
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def launch(fn, cfg, module: str, nproc: int, config_path: str | Path, *args: str):
    """One stage: `fn(cfg)` in this process, or with nproc > 1 (or on several nodes: nodes.py) the config saved to
    `config_path` and `python -m module --config config_path ARGS` under torchrun (its main reads the config back
    exactly)."""
    from selfreward import nodes
    if nproc <= 1 and not nodes.leading():
        return fn(cfg)
    write_json(config_path, to_dict(cfg))
    nodes.torchrun(nproc, ["-m", module, "--config", str(config_path), *args])


class Stopped(RuntimeError):
    """A run that stopped itself for a reason its message explains (a non-finite loss): exit 1, no traceback."""


def error_line(msg: object, head: int = 300, tail: int = 150) -> str:
    """`error: MSG`; a longer one (a 6 MB field echoed) keeps its two ends: `... (6.0 MB cut) ...`."""
    msg = str(msg)
    if len(msg) > head + tail + 40:
        n = len(msg[head:-tail].encode())
        size = f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} bytes"
        msg = f"{msg[:head]} ... ({size} cut) ... {msg[-tail:]}"
    return f"error: {msg}"


def run_main(main, argv: list[str] | None = None, interrupted: str = "interrupted: finished work is kept (nothing "
             "half-written counts as done); rerun the same command to continue") -> None:
    """Every entry point's `__main__`: a DataError (bad input, flag, checkpoint, tokenizer, template) or OSError
    prints `error: ...` and exits 2, a `Stopped` run exits 1, Ctrl-C prints `interrupted` (what was kept and how
    to continue) and exits 130; never a traceback for those."""
    try:
        rc = main(argv) if argv is not None else main()
    except (Stopped, DataError, OSError, UnicodeDecodeError) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.filename}: {e.strerror or e}" + (f" (-> {e.filename2})" if e.filename2 else "")
        elif isinstance(e, UnicodeDecodeError):   # a reader that does not name its file still says what was wrong
            msg = f"a file is not UTF-8 text ({e})"
        print(error_line(msg), file=sys.stderr)
        sys.exit(1 if isinstance(e, Stopped) else 2)
    except KeyboardInterrupt:         # every output is written atomically or resumably: nothing to tidy here
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
