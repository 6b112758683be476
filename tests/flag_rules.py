"""Every entry point's flags with the rule that checks each, and a probe of every numeric flag (issue 33).

    python tests/flag_rules.py --write docs/flags.md     # regenerate the table (tests/test_flag_rules.py checks it)

Each entry's argparse parser is taken without running the command (`--help` with `print_help` caught). Each
numeric flag is then probed in this process: the entry's `main` with that flag set to a bad value (floats: nan,
inf, -1; ints: -1, 0; and a value outside its `ranges.RANGES` rule), every required path pointing at a missing
file (or under a plain file, for outputs), so the run fails at the first file it touches if the value passed the
door. What comes out is the verdict: an error naming the flag (refused at the door), the missing file (the value
passed), or the time limit (the run started work).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import math
import os
import random
import re
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfreward import cli, ranges
from selfreward.records import DataError

ROOT = Path(cli.__file__).resolve().parent
M, O = "{missing}", "{out}"      # placeholders: a missing input file; an output under a plain file (unwritable)
LIMIT = 5.0                       # seconds a probe may run before it counts as "started work"


@dataclass
class Entry:
    name: str                     # as the table shows it
    module: str                   # whose main(argv) runs it
    args: list[str]               # the required flags (M / O placeholders) and a subcommand
    helps: list[tuple[list[str], str]] = field(default_factory=lambda: [(["--help"], "")])  # argv, flag prefix


ENTRIES = [
    Entry("infer/sample.py", "selfreward.infer.sample", ["--model", M, "--input", M, "--output", O]),
    Entry("train/sft.py", "selfreward.train.sft", ["--model", M, "--data", M, "--output", O]),
    Entry("train/dpo.py", "selfreward.train.dpo", ["--model", M, "--data", M, "--output", O]),
    Entry("train/rm.py", "selfreward.train.rm", ["--model", M, "--data", M, "--output", O]),
    Entry("train/rl.py", "selfreward.train.rl", ["--model", M, "--data", M, "--reward-model", M, "--output", O]),
    Entry("recipes.self_reward", "selfreward.recipes.self_reward", ["--init-model", M, "--seed-prompts", M, "--run-dir", O]),
    Entry("recipes.humpback", "selfreward.recipes.humpback",
          ["--base-model", M, "--seed-data", M, "--unlabelled", M, "--run-dir", O]),
    Entry("recipes.humpback_oasst", "selfreward.recipes.humpback_oasst", ["--oasst-input", M, "--run-dir", O]),
    Entry("recipes.select", "selfreward.recipes.select", ["--reference", M, "--prompts", M, "--candidates", M]),
    Entry("recipes.evaluate rm", "selfreward.recipes.evaluate", ["rm", "--judge", M, "--groups", M, "--out", O],
          [(["rm", "--help"], "")]),
    Entry("recipes.evaluate h2h", "selfreward.recipes.evaluate",
          ["h2h", "--a", M, "--b", M, "--judge", M, "--prompts", M, "--out", O], [(["h2h", "--help"], "")]),
    Entry("recipes.evaluate reward", "selfreward.recipes.evaluate",
          ["reward", "--model", M, "--groups", M, "--out", O], [(["reward", "--help"], "")]),
    Entry("recipes.rlaif label", "selfreward.recipes.rlaif", ["label", "--labeller", M, "--pairs", M, "--out", O],
          [(["label", "--help"], "")]),
    Entry("recipes.oasst", "selfreward.recipes.oasst", ["--input", M, "--out", O]),
    Entry("recipes.verifiable", "selfreward.recipes.verifiable", ["--oasst", M, "--out", O]),
    Entry("recipes.rlaif_run", "selfreward.recipes.rlaif_run",
          ["--policy", M, "--pairs", M, "--prompts", M, "--run-dir", O]),
    Entry("recipes.real_demo", "selfreward.recipes.real_demo", ["--model", M, "--run-dir", O]),
    Entry("recipes.world.demo", "selfreward.recipes.world.demo", ["--run-dir", O, "--cache-dir", O]),
    Entry("recipes.world.demo --method rlaif", "selfreward.recipes.world.demo",
          ["--method", "rlaif", "--run-dir", O, "--cache-dir", O], [(["--method", "rlaif", "--help"], "")]),
    Entry("recipes.world.demo --method humpback", "selfreward.recipes.world.demo",
          ["--method", "humpback", "--run-dir", O, "--cache-dir", O], [(["--method", "humpback", "--help"], "")]),
    Entry("recipes.world.build", "selfreward.recipes.world.build", ["--out", O, "--cache-dir", O],
          [(["--help"], ""), (["--m0-help"], "--m0-")]),
]


@dataclass
class Flag:
    name: str                     # the flag as its parser spells it (aliases after a comma)
    kind: str                     # int, float, str, bool, choice, positional
    default: str
    choices: tuple = ()
    many: bool = False            # takes several values
    prefix: str = ""              # spelled with this prefix on the command line (world.build's --m0-*)
    rule: str = ""
    probes: dict = field(default_factory=dict)   # value -> (verdict, where, message)

    @property
    def spelled(self) -> str:
        return self.prefix + self.name.split(",")[0].removeprefix("--") if self.prefix else self.name.split(",")[0]


class _Help(Exception):
    def __init__(self, parser):
        self.parser = parser


class _Timeout(BaseException):
    pass


def _raise_parser(self, file=None):
    raise _Help(self)


def parser_of(entry: Entry, argv: list[str]) -> argparse.ArgumentParser:
    """The parser `entry` prints its help with for `argv`, without running anything else."""
    old = argparse.ArgumentParser.print_help
    argparse.ArgumentParser.print_help = _raise_parser
    try:
        importlib.import_module(entry.module).main(argv)
    except _Help as p:
        return p.parser
    finally:
        argparse.ArgumentParser.print_help = old
    raise AssertionError(f"{entry.name} {argv}: printed no help")


def flags_of(entry: Entry) -> list[Flag]:
    out = []
    for argv, prefix in entry.helps:
        for a in parser_of(entry, argv)._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            cli_default = a.default is None and (a.help or "").endswith(")") and "(default: " in a.help
            default = a.help.rsplit("(default: ", 1)[1][:-1] if cli_default else repr(a.default)
            default = default.replace(str(ROOT), "PACKAGE").replace(str(Path.home()), "~")   # the same on any machine
            name = ", ".join(a.option_strings) or a.dest
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
                kind = "bool"
            elif a.choices:
                kind = "choice"
            elif a.type in (int, float):
                kind = a.type.__name__
            else:
                kind = "str"
            out.append(Flag(name, kind, default, tuple(a.choices or ()), a.nargs == "+" or
                            isinstance(a, argparse._AppendAction), prefix))
    return out


def range_rule(flag: Flag):
    return ranges.RANGES.get(ranges.range_suffix(flag.name.split(",")[0].lstrip("-").replace("-", "_")))


def outside(rule, kind: str) -> list[float]:
    """Values the RANGES rule refuses (one below, one above where it has bounds)."""
    lo, hi, lo_open, hi_open = rule
    step = 1 if kind == "int" else 0.5
    vals = []
    if lo is not None:
        vals.append(lo if lo_open else lo - step)
    if hi is not None:
        vals.append(hi if hi_open else hi + step)
    return vals


def bad_values(flag: Flag) -> list:
    if flag.kind not in ("int", "float"):
        return ["bogus"] if flag.kind == "str" and text_kind(flag) == CHOICE else []
    vals = [math.nan, math.inf, -1.0] if flag.kind == "float" else [-1, 0]
    rule = range_rule(flag)
    for v in outside(rule, flag.kind) if rule else []:
        if v not in vals:
            vals.append(v)
    return vals


def fmt(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def call(entry: Entry, argv: list[str], tmp: Path) -> tuple[str, str, str]:
    """`entry`'s main on `argv` in this process -> (outcome, where it was raised, message)."""
    argv = [a.replace(M, str(tmp / "missing")).replace(O, str(tmp / "plain" / "out")) for a in argv]
    main = importlib.import_module(entry.module).main
    err, cwd, env = io.StringIO(), os.getcwd(), dict(os.environ)
    state = (torch.get_num_threads(), torch.get_rng_state(), random.getstate())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def alarm(*_):
        raise _Timeout

    sites, init = [], DataError.__init__

    def record(self, *a):                           # where each DataError (ConfigError, ...) is made
        init(self, *a)
        self._site = _site(None, sys._getframe(1))
        sites.append(self._site)
    DataError.__init__ = record
    old = signal.signal(signal.SIGALRM, alarm)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    try:
        os.chdir(tmp)
        signal.setitimer(signal.ITIMER_REAL, LIMIT)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        if isinstance(rc, int) and rc:              # sample.py prints its error and returns 2
            return "returned", sites[-1] if sites else "", err.getvalue().strip().splitlines()[-1]
        return "returned", "", ""
    except _Timeout:
        return "timeout", "", ""
    except SystemExit as e:
        return "exit", "argparse", err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else str(e)
    except KeyboardInterrupt:
        raise
    except BaseException as e:    # run_main: a DataError or OSError is `error: ...` exit 2, anything else a traceback
        kind = "error" if isinstance(e, (DataError, OSError)) else f"traceback ({type(e).__name__})"
        return kind, getattr(e, "_site", "") or _site(e.__traceback__), str(e)
    finally:
        DataError.__init__ = init
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for s, h in handlers.items():
            signal.signal(s, h)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(state[0])
        torch.set_rng_state(state[1])
        random.setstate(state[2])


def _site(tb, frame=None) -> str:
    """module.function of the innermost frame in this package (a traceback's or a frame's callers)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    frames.reverse()
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    for f in frames:
        if f.f_code.co_filename.startswith(str(ROOT)) and f.f_code.co_name != "__init__":
            mod = Path(f.f_code.co_filename).relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            return f"{mod}.{f.f_code.co_qualname.split('.<locals>')[0]}"
    return ""


def names(message: str, flag: Flag) -> bool:
    spellings = [flag.spelled] + [s.strip() for s in flag.name.split(",")]
    return any(re.search(re.escape(s) + r"(?![\w-])", message) for s in spellings)


def verdict(flag: Flag, outcome: tuple[str, str, str], tmp: Path) -> str:
    kind, where, msg = outcome
    if kind == "timeout" or (kind == "returned" and not msg):
        return "started work" if kind == "timeout" else "accepted"
    if kind.startswith("traceback"):
        return kind
    if str(tmp) in msg:
        return "passed"              # the value went through; the run stopped at the missing file
    return "refused" if names(msg, flag) else "refused, not named"


def probe(entry: Entry, flags: list[Flag], tmp: Path) -> tuple[str, str, str]:
    """Every numeric flag of `entry` with each of its bad values -> the flags' `probes`; -> the outcome of
    the required flags alone (it must be the missing file)."""
    base = call(entry, entry.args, tmp)
    for f in flags:
        for v in bad_values(f):
            out = call(entry, entry.args + [f.spelled, fmt(v)], tmp)
            f.probes[fmt(v)] = (verdict(f, out, tmp),) + out[1:]
    return base


CHOICE = "a named choice"
# What a text flag is, by the last part of its name (as RANGES, first match): every text flag is one of these
TEXT = {
    "template": "a template file or a built-in name: checked when loaded",
    "dir": "output folder", "out": "output path (never over an input; a record of what made it)",
    "output": "output path (never over an input; a record of what made it)", "report": "output file (as --out)",
    "export": "output folder", "lang": "a language code: checked against the input (the languages it has)",
    "tag": "free text", "header": "free text", "prefix": "free text", "stop": "free text (not empty)",
    "system_prompt": "free text", "endpoint": "HOST:PORT: checked with --nnodes > 1 (nodes.NodeConfig)",
    "run_name": "free text",
    "label": "free text (not empty): the meta-judge's verdict label, checked when the config is built",
    "choices": "two different names, comma-separated: checked when the config is built (recipes/meta_judge.py)",
    "url": "URL[,URL...] of OpenAI-compatible servers: each must answer /v1/models with the stage's checkpoint",
    "report_to": "tensorboard, wandb, mlflow or none, or a comma list: each one known and installed (train/report.py)",
    "config": "a JSON or YAML file (must exist), then KEY=VALUE overrides, each checked as its flag",
    **{k: CHOICE for k in ("device", "dtype", "loss", "schedule", "ref_mode", "estimator", "reward", "reward_weight",
                           "score_from", "pairing", "backend", "prompt_source", "rm_labels", "judge_format", "kinds", "controls",
                           "sources")},
    **{k: "input path: must exist" for k in (
        "model", "input", "data", "groups", "pairs", "labeller", "judge", "a", "b", "reference", "candidates",
        "seed_data", "prompts", "unlabelled", "extra_seed", "seed", "tokenizer", "sft_mix", "policy",
        "oasst")},
}


def text_kind(flag: Flag) -> str:
    name = flag.spelled.lstrip("-").replace("-", "_")
    return next((v for k, v in TEXT.items() if name == k or name.endswith("_" + k)), "")


def words(rule, kind: str) -> str:
    """A RANGES rule in words."""
    lo, hi, lo_open, hi_open = rule
    if lo is None and hi is None:
        return "any integer" if kind == "int" else "any finite number"
    fin = "finite, " if kind == "float" else ""
    if hi is None:
        return f"{fin}{'>' if lo_open else '>='} {lo}"
    return f"{fin}in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def expected_refused(flag: Flag, value: str) -> bool:
    """Must the door refuse `value`: a non-finite number, one its RANGES rule refuses, any bad value of a flag
    with no RANGES rule (its own check has to refuse it), "bogus" for a named choice."""
    if flag.kind not in ("int", "float"):
        return True
    v, rule = float(value), range_rule(flag)
    if not math.isfinite(v) or rule is None:
        return True
    try:
        ranges.check_number(flag.name.split(",")[0], v)
    except cli.ConfigError:
        return True
    return False


def rule_of(flag: Flag) -> tuple[str, str]:
    """(the rule in words, what checks it) for the table."""
    if flag.kind == "bool":
        return "on / off", "argparse"
    if flag.choices:
        return "one of " + ", ".join(map(repr, flag.choices)), "argparse"
    if flag.kind == "str":
        kind = text_kind(flag)
        refusal = flag.probes.get("bogus")
        if kind == CHOICE and refusal and refusal[0].startswith("refused"):
            return f"{kind}: {refusal[2]}", refusal[1]
        return kind or "UNCLASSIFIED (add it to flag_rules.TEXT)", ""
    rule = range_rule(flag)
    refusals = [p for v, p in flag.probes.items() if p[0] == "refused" and (rule is None or math.isfinite(float(v)))]
    stricter = [p for v, p in flag.probes.items() if p[0] == "refused" and not expected_refused(flag, v)]
    extra = next(iter(stricter or refusals), None)
    if rule is not None:
        suffix = ranges.range_suffix(flag.spelled.lstrip("-").replace("-", "_"))
        text, by = words(rule, flag.kind), f"ranges.RANGES[{suffix!r}]"
        if extra and extra[1] != "ranges.check_number":
            text, by = f"{text}; {extra[2]}", f"{by}, {extra[1]}"
        return text, by
    if extra:
        return ("finite; " if flag.kind == "float" else "") + extra[2], extra[1]
    return "NOT CHECKED at the door", ""


# Known problems, each with why it is left: (entry, flag) -> note. The test fails on any other problem, and on
# an entry here that is no longer a problem.
KNOWN: dict = {}   # (entry point, flag) -> why a numeric flag still passes the door (none today)


def probe_words(flag: Flag, value: str, verdict: str) -> str:
    if verdict == "refused":
        return "refused"
    if verdict == "passed" and not expected_refused(flag, value):
        return "passes (in the rule)"
    return "TRACEBACK" + verdict[9:] if verdict.startswith("traceback") else verdict.upper()


def problems(entry: str, flag: Flag) -> list[str]:
    """What is wrong with `flag`: a bad value the door let through, a refusal that does not name the flag."""
    out = []
    if flag.kind == "str" and not text_kind(flag):
        out.append(f"{entry} {flag.name}: a text flag of no known kind (add it to flag_rules.TEXT)")
    for v, (verdict, where, msg) in flag.probes.items():
        if verdict == "refused" or flag.kind == "str":     # a named choice's probe is reported, not required
            continue
        if verdict != "passed" or expected_refused(flag, v):
            out.append(f"{entry} {flag.spelled} {v}: {verdict} ({where or '-'}: {msg[:160]})")
    return out


def survey() -> dict[str, tuple[list[Flag], tuple]]:
    """Every entry's flags, probed -> {entry: (flags, the outcome of its required flags alone)}."""
    comments = cli._comments
    cli._comments = functools.cache(comments)          # the probes build each parser many times
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d).resolve()
            (tmp / "plain").write_text("a plain file: nothing can be written under it\n")
            out = {}
            for e in ENTRIES:
                flags = flags_of(e)
                base = probe(e, flags, tmp)
                for f in flags:
                    f.probes = {k: (p[0], p[1], _short(p[2], tmp)) for k, p in f.probes.items()}
                out[e.name] = (flags, (base[0], base[1], _short(base[2], tmp)))
            return out
    finally:
        cli._comments = comments


def _short(msg: str, tmp: Path) -> str:
    msg = msg.replace(str(tmp / "missing"), "MISSING").replace(str(tmp / "plain" / "out"), "UNWRITABLE")
    return re.sub(r"\s+", " ", msg.removeprefix("error: ")).replace("|", "\\|")


def markdown(result: dict) -> str:
    lines = ["# Every entry point's flags, and the rule that checks each", "",
             "Generated by `python tests/flag_rules.py --write docs/flags.md`; `tests/test_flag_rules.py` fails "
             "when this file is not what the generator writes now, or when a probe below lets a bad value through. "
             "Do not edit it by hand.", "",
             "Each numeric flag was probed in process: the command's `main` with the flag set to a bad value "
             "(floats: nan, inf, -1; ints: -1, 0; and a value just outside its `ranges.RANGES` rule), every required "
             "path MISSING (or UNWRITABLE, under a plain file), so a value that passes the door stops at the first "
             "file. *refused*: an error naming the flag, before any file or model; *passed*: the value went "
             "through to the missing file (allowed only where the rule accepts it). A named choice (text) was "
             "probed with `bogus`. Numbers from `--config FILE` go through the same `ranges.check_number`.", ""]
    total = checked = 0
    summary = []
    for name, (flags, base) in result.items():
        nums = [f for f in flags if f.kind in ("int", "float")]
        total += len(flags)
        bad = [p for f in flags for p in problems(name, f)]
        checked += len(nums)
        summary.append(f"| {name} | {len(flags)} | {len(nums)} | {len(bad) or 'none'} |")
    lines += ["| entry point | flags | numeric | problems |", "|---|---|---|---|", *summary, "",
              f"{len(result)} entry points, {total} flags ({checked} numeric).", "",
              "Known problems (flag_rules.KNOWN):", "", *[f"- {e} `{f}`: {note}" for (e, f), note in KNOWN.items()],
              "", "Named choices (text flags) whose `bogus` the door lets through or refuses without naming the "
              "flag (refused later, where the value is used; not numeric, so not required here):", ""]
    lines += [f"- {name}: " + ", ".join(f"`{f.spelled}` ({f.probes['bogus'][0]})" for f in flags
                                         if f.probes.get("bogus", ("refused",))[0] != "refused")
              for name, (flags, _) in result.items()
              if any(f.probes.get("bogus", ("refused",))[0] != "refused" for f in flags)]
    lines.append("")
    for name, (flags, base) in result.items():
        e = next(x for x in ENTRIES if x.name == name)
        args = " ".join(e.args).replace(M, "MISSING").replace(O, "UNWRITABLE")
        lines += [f"## {name}", "", f"Probed with `{args}`; these alone stop at: {base[2][:160]}", "",
                  "| flag | type | default | rule | checked by | probes |", "|---|---|---|---|---|---|"]
        for f in flags:
            rule, by = rule_of(f)
            if problems(name, f):
                by = f"NOT AT THE DOOR here (see the known problems; the rule is {by})"
            kind = f.kind + ("s" if f.many else "")
            probes = ", ".join(f"{v}: {probe_words(f, v, p[0])}" for v, p in f.probes.items())
            default = f.default if len(f.default) <= 40 else f.default[:37] + "..."
            lines.append(f"| `{f.name if not f.prefix else f.spelled}` | {kind} | `{default}` | {rule} | {by} | {probes} |"
                         .replace("``", "").replace("\n", " "))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="list every entry point's flags and probe the numeric ones")
    ap.add_argument("--write", metavar="FILE", help="write the table (docs/flags.md); default: print the problems")
    a = ap.parse_args()
    res = survey()
    if a.write:
        Path(a.write).write_text(markdown(res) + "\n", encoding="utf-8")
    bad = [p for name, (flags, _) in res.items() for f in flags for p in problems(name, f)]
    print("\n".join(bad) or "no problems", file=sys.stderr)
    sys.exit(1 if bad else 0)
