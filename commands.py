"""`selfreward <command> [flags]`: every entry point behind one console command (pyproject's [project.scripts]).

`selfreward sft --model M0 ...` runs exactly what `python -m selfreward.train.sft --model M0 ...` runs (the
module's own `__main__` block); `selfreward --help` lists the commands, `selfreward <command> --help` its flags.
Under torchrun: `torchrun --nproc_per_node 8 --no-python selfreward dpo ...`. Imports nothing of ours until a
command is chosen (tests/test_commands.py checks that every module with a `__main__` has a command here).
"""

import difflib
import runpy
import sys

COMMANDS = {   # command -> (module, what it does)
    "sample": ("selfreward.infer.sample", "sample completions for a JSONL file of prompts"),
    "sft": ("selfreward.train.sft", "supervised fine-tuning"),
    "dpo": ("selfreward.train.dpo", "direct preference optimisation (and IPO, cDPO, rDPO, SimPO)"),
    "rm": ("selfreward.train.rm", "reward-model training on soft preference labels"),
    "rl": ("selfreward.train.rl", "online RL of a policy against an AI reward (RLAIF)"),
    "self-reward": ("selfreward.recipes.self_reward", "the self-rewarding loop: prompts, candidates, judge, DPO"),
    "humpback": ("selfreward.recipes.humpback", "instruction backtranslation (Humpback)"),
    "humpback-oasst": ("selfreward.recipes.humpback_oasst", "Humpback on Open Assistant trees"),
    "rlaif": ("selfreward.recipes.rlaif", "RLAIF AI preference labels (rlaif label ...)"),
    "rlaif-run": ("selfreward.recipes.rlaif_run", "RLAIF end to end: label -> reward model -> RL"),
    "oasst": ("selfreward.recipes.oasst", "seed data (IFT, EFT, ranked groups) from Open Assistant exports"),
    "verifiable": ("selfreward.recipes.verifiable", "prompts with IFEval's verifiable instructions"),
    "evaluate": ("selfreward.recipes.evaluate", "reward-model metrics and head-to-head evaluation"),
    "select": ("selfreward.recipes.select", "checkpoint selection by head-to-heads against a reference"),
    "real-demo": ("selfreward.recipes.real_demo", "the methods on a real instruct model (SmolLM2-135M)"),
    "world-demo": ("selfreward.recipes.world.demo", "the whole loop on the checkable world, on a CPU, in minutes"),
    "world-build": ("selfreward.recipes.world.build", "the world's tokenizer, M0, seeds and M1"),
    "world-rlaif": ("selfreward.recipes.world.rlaif", "RLAIF in the checkable world"),
    "gguf": ("selfreward.model.gguf", "a GGUF file -> a Hugging Face folder"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: selfreward <command> [flags]   (selfreward <command> --help: its flags)\n\ncommands:\n"
            + "".join(f"  {c:<{width}}  {what}\n" for c, (_, what) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    cmd, *rest = argv
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, COMMANDS, 1)
        print(f"error: unknown command {cmd!r}" + (f"; did you mean {close[0]!r}?" if close else "")
              + "; `selfreward --help` lists them", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"selfreward {cmd}", *rest]
    runpy.run_module(COMMANDS[cmd][0], run_name="__main__", alter_sys=True)
