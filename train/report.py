"""--report-to: the records the trainers write to metrics.jsonl, forwarded to TensorBoard, W&B or MLflow
(rank 0; train/loop.MetricsLog). Each package is imported only when asked for; a missing one is refused by
`check` when the config is checked, before any work."""

import difflib
import importlib.util
import sys
from pathlib import Path

from selfreward.ranges import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}   # --report-to name -> import


def parse(report_to: str, flag: str = "--report-to") -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "none" -> []; an unknown name is a ConfigError."""
    names = [x.strip() for x in report_to.split(",") if x.strip()]
    for x in names:
        if x not in (*PACKAGES, "none"):
            close = difflib.get_close_matches(x, PACKAGES, 1)
            raise ConfigError(f"{flag} {x!r}: choose tensorboard, wandb, mlflow or none (a comma list for several)"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
    if "none" in names and len(names) > 1:
        raise ConfigError(f"{flag} {report_to!r}: 'none' with a dashboard; choose one")
    return [x for x in names if x != "none"]


def check(report_to: str, flag: str = "--report-to") -> None:
    """Each dashboard asked for is installed (else `--report-to tensorboard: pip install tensorboard`)."""
    for x in parse(report_to, flag):
        mod = PACKAGES[x]
        if sys.modules.get(mod) is None and importlib.util.find_spec(mod) is None:   # (a test's fake counts)
            raise ConfigError(f"{flag} {x}: pip install {mod}")


def for_stage(report_to: str, run_dir: str | Path, stage: str) -> dict:
    """A loop's trainer settings for one stage (dataclasses.replace): TensorBoard under RUN/tensorboard/STAGE
    (`tensorboard --logdir RUN/tensorboard` shows every stage), W&B / MLflow runs named RUN-STAGE."""
    return {"report_to": report_to, "run_name": f"{Path(run_dir).name}-{stage}",
            "tensorboard_dir": str(Path(run_dir) / "tensorboard" / stage)}


class Reporter:
    """The dashboards of one run: `log(record)` sends the record's numbers (but "step") at its step."""

    def __init__(self, report_to: str, run_name: str, tensorboard_dir: str | Path, config: dict,
                 resume_step: int | None = None):
        self.sinks = []
        for x in parse(report_to):
            if x == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: a resumed run's events past its checkpoint are dropped, as metrics.jsonl drops them
                w = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)
                self.sinks.append((lambda m, s, w=w: ([w.add_scalar(k, v, s) for k, v in m.items()], w.flush()),
                                   w.close))
            elif x == "wandb":
                import wandb
                run = wandb.init(name=run_name, config=config)   # project: WANDB_PROJECT, as wandb reads it
                self.sinks.append((lambda m, s, run=run: run.log(m, step=s), run.finish))
            else:
                import mlflow
                mlflow.start_run(run_name=run_name)
                mlflow.log_dict(config, "config.json")
                self.sinks.append((lambda m, s: mlflow.log_metrics(m, step=s), mlflow.end_run))

    def log(self, rec: dict) -> None:
        scalars = {k: float(v) for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for send, _ in self.sinks:
            send(scalars, int(rec["step"]))

    def close(self) -> None:
        for _, close in self.sinks:
            close()
        self.sinks = []
