"""The settings the four trainers share (SFTConfig, DPOConfig, RMConfig and RLConfig extend TrainConfig; cli.py
makes the flags). `check()` runs once, at the entry (train.loop.train); nothing changes a config after it.
"""

from dataclasses import dataclass

from selfreward.cli import ConfigError, checkpoint, choice, input_file, passive
from selfreward.ranges import check_fields
from selfreward.train import report


@dataclass
class TrainConfig:
    model: str = checkpoint("")                   # HF checkpoint folder to start from (also the DPO reference)
    data: list[str] = input_file([])  # JSONL (.jsonl.gz), parquet, datasets.save_to_disk folder(s)
    output: str = passive("")                  # run folder: metrics.jsonl, checkpoints/, model/
    export: str = passive("")                  # final HF export folder (default: OUTPUT/model)
    export_dtype: str = choice("auto", "float32", "bfloat16", "float16", shapes=False)  # weights on disk; auto = --model's
    tokenizer: str = checkpoint("")               # tokenizer folder (default: --model)
    max_steps: int = 0                # optimizer steps; 0 = epochs x (examples // batch_size)
    epochs: int = 1
    batch_size: int = 16              # GLOBAL batch in examples = micro x accumulation x world (TRL's is per device)
    micro_batch_size: int = passive(0)         # examples per forward per rank (TRL's per_device_train_batch_size); 0 = batch // world
    lr: float = 1e-5
    final_lr: float = 1e-6            # the schedule decays lr to this at the last step
    schedule: str = choice("cosine", "linear")
    warmup_steps: int = -1            # linear warmup from 0; -1 = 3% of the steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0            # max global grad norm; 0 = no clipping
    max_length: int = 2048            # tokens per example (see train/data.py for the truncation rule)
    dropout: float = 0.1
    seed: int = 0
    shuffle: bool = True              # shuffle examples each epoch (a function of seed and epoch)
    save_every: int = passive(0)               # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = passive(2)
    resume: bool = passive(False)              # continue from OUTPUT/checkpoints/latest if there is one
    overwrite: bool = passive(False)           # start over: remove the checkpoints, metrics and model of OUTPUT's earlier run
    log_every: int = passive(1)                # a step line every N steps (on a terminal: one line, updated in place)
    report_to: str = passive("none")           # dashboards: tensorboard | wandb | mlflow | none, or a comma list
    run_name: str = passive("")                # the run's name on them (default: OUTPUT's folder name)
    tensorboard_dir: str = passive("")         # TensorBoard's event folder (default: OUTPUT/tensorboard)
    activation_checkpointing: bool = passive(False)
    selective_checkpointing: bool = False  # keep matmul outputs, recompute the rest (ignored with the above)
    mixed_precision: bool = True      # bf16 params + fp32 reduction under FSDP on CUDA (CPU: see --cpu-bf16)
    cpu_bf16: bool = False            # CPU: forward under torch.autocast(bfloat16), fp32 weights and optimizer
    threads: int = passive(0)                  # torch.set_num_threads (0 = leave as is)
    release_freed_memory: bool = passive(False)  # CPU: blocks >= 128 KiB unmapped when freed (train/heap.py; DPO: on)
    device: str = passive("auto")              # auto: cuda:LOCAL_RANK where available, else cpu | cpu | cuda
    sleep_per_step: float = passive(0.0)       # test aid: slow the loop so a test can kill it mid-run

    def check(self) -> None:
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.max_steps == 0 and self.epochs == 0:   # the untouched model would be exported as trained
            raise ConfigError("--epochs 0 / --max-steps 0: 0 optimizer steps to take")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite: choose one (continue the run, or start it over)")
        check_fields(self)                   # the door's ranges (ranges.RANGES), for a config built in Python too
        report.check(self.report_to)         # the dashboards' packages are installed
        mpl = getattr(self, "max_prompt_length", None)   # DPO and the reward model
        if mpl is not None and not 2 <= (mpl or self.max_length // 2) < self.max_length:
            raise ConfigError(f"--max-prompt-length {mpl} (0 = max-length // 2): must lie in [2, --max-length "
                              f"{self.max_length})")
