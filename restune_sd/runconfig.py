"""A training run's settings: `RunConfig` with its bounds, the learning-rate schedule it names, which settings a
resumed run may change, and the trackers it reports to."""

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from restune_sd.bounds import MAX_SEED, check_bounds, require_number
from restune_sd.ema import check_ema_settings
from restune_sd.errors import UserError
from restune_sd.optimizers import check_optimizer_settings

# diffusers.optimization.get_scheduler's schedules (checked here without importing diffusers).
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                "piecewise_constant")
TRACKERS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb"), "none": ()}
TRACKER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
PROJECT = "restune-sd"  # the wandb project; TensorBoard logs go to RUN_DIR/tensorboard/restune-sd/
WHOLE = {"integer": True}
# Far above any real run, far below sizes that exhaust memory or overflow: a step's samples are listed in memory,
# seeds feed torch.Generator (< 2**64 with the per-image offsets), and AdamW's step is about the learning rate.
MAX_BATCH = 65536
MAX_STEPS = 10**9
MAX_LEARNING_RATE = 10.0


@dataclass(kw_only=True)
class RunConfig:
    """The settings every training run has: where it writes, how long it runs, and how it optimises."""

    output: str = field(metadata={"help": "run directory (must be new or empty, unless resuming)"})
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    optimizer: str = field(default="adamw", metadata={"help": "adamw, adamw8bit, prodigy, adafactor, lion or sgd"})
    optimizer_args: dict | None = field(default=None, metadata={"help": "the optimizer's other keyword arguments, "
                                                                        "KEY=VALUE strings or a mapping"})
    ema: bool = field(default=False, metadata={"help": "keep an EMA of the trainable weights, saved as RUN/tuner-ema"})
    ema_decay: float = field(default=0.9999, metadata={"help": "the EMA's decay, 0 to below 1"})
    ema_warmup: bool = field(default=False, metadata={"help": "EMAModel's use_ema_warmup: decay 1 - (1 + step) ** -power"})
    ema_power: float = field(default=2 / 3, metadata={"help": "the power of --ema-warmup's ramp"})
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    lr_step_rules: str | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    report_to: str = field(default="tensorboard", metadata={"help": "trackers of loss, lr and validation: tensorboard, "
                                                                    "wandb, all (both) or none"})
    tensorboard: bool = field(default=False, metadata={"help": "deprecated: the same as report_to='tensorboard'"})
    num_workers: int = 0

    # Settings a resumed run may change: they decide how long it runs, what it records and how fast, never what it learns.
    SAFE_ON_RESUME: ClassVar[tuple[str, ...]] = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints",
                                                 "report_to", "tensorboard", "num_workers")
    BOUNDS: ClassVar[dict] = {
        "epochs": {**WHOLE, "minimum": 1, "maximum": MAX_STEPS}, "batch_size": {**WHOLE, "minimum": 1, "maximum": MAX_BATCH},
        "gradient_accumulation": {**WHOLE, "minimum": 1, "maximum": MAX_BATCH},
        "max_steps": {**WHOLE, "minimum": 1, "maximum": MAX_STEPS, "optional": True},
        "warmup_steps": {**WHOLE, "minimum": 0, "maximum": MAX_STEPS},
        "learning_rate": {"above": 0, "maximum": MAX_LEARNING_RATE}, "weight_decay": {"minimum": 0, "maximum": 1e3},
        # Below about 1e-30 the epsilon is 0 in fp32, and AdamW divides 0 by 0 where a gradient is 0.
        "adam_epsilon": {"minimum": 1e-30, "maximum": 1}, "max_grad_norm": {"minimum": 0},
        "seed": {**WHOLE, "minimum": 0, "maximum": MAX_SEED},
        "checkpoint_every": {**WHOLE, "minimum": 0, "maximum": MAX_STEPS},
        "keep_checkpoints": {**WHOLE, "minimum": 1, "maximum": 10**6},
        "num_workers": {**WHOLE, "minimum": 0, "maximum": 1024}, "lr_num_cycles": {**WHOLE, "minimum": 1, "maximum": MAX_STEPS},
        "lr_power": {"above": 0, "maximum": 1e3},
    }

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        if self.lr_scheduler not in LR_SCHEDULES:
            raise UserError(f"unknown --lr-scheduler {self.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULES)}")
        if (self.lr_scheduler == "piecewise_constant") != (self.lr_step_rules is not None) or not valid_step_rules(self):
            raise UserError("--lr-step-rules goes with --lr-scheduler piecewise_constant, as FACTOR:STEP,...,FACTOR "
                            "(e.g. 1:1000,0.1:2000,0.01)")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"unknown --mixed-precision {self.mixed_precision!r}: use no, fp16 or bf16")
        if self.report_to not in TRACKERS:
            raise UserError(f"unknown --report-to {self.report_to!r}: use tensorboard, wandb, all or none")
        if self.tensorboard and self.report_to == "none":
            raise UserError("--tensorboard asks for TensorBoard logs and --report-to none for none: drop one of them")
        if self.tensorboard:  # the older flag, folded in so config.json records one setting
            self.report_to, self.tensorboard = "all" if self.report_to in ("wandb", "all") else "tensorboard", False
        check_bounds(self, self.BOUNDS)
        check_optimizer_settings(self)
        check_ema_settings(self)
        if len(self.adam_betas) != 2:
            raise UserError(f"adam_betas must be two numbers, not {self.adam_betas!r}")
        for beta in self.adam_betas:
            require_number("adam_betas", beta, minimum=0, maximum=0.9999999)

    def warmup(self, steps_per_epoch: int) -> int:
        """Warm-up length in optimizer steps."""
        return self.warmup_steps


def valid_step_rules(cfg: RunConfig) -> bool:
    """`FACTOR:STEP,...,FACTOR`, diffusers' piecewise_constant rules (or none given)."""
    if cfg.lr_step_rules is None:
        return True
    *rules, last = str(cfg.lr_step_rules).split(",")
    try:
        [(float(factor), int(step)) for factor, step in (rule.split(":") for rule in rules)]
        float(last)
    except ValueError:
        return False
    return True


def lr_schedule(optimizer, cfg: RunConfig, total_steps: int, warmup: int):
    """diffusers' schedule `cfg.lr_scheduler`, counted in optimizer steps whatever the process count.

    diffusers' `constant` ignores a warm-up, so `constant` with warm-up steps is its `constant_with_warmup`.
    """
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and warmup else cfg.lr_scheduler
    return get_scheduler(name, optimizer, step_rules=cfg.lr_step_rules, num_warmup_steps=warmup,
                         num_training_steps=total_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def same_setting(name: str, old, new) -> bool:
    """Whether two values of a setting mean the same run: local model and data paths compare resolved."""
    if name == "model":
        return resolved(old) == resolved(new)
    if name == "data":
        (old_prefix, _, old_root), (new_prefix, _, new_root) = str(old).partition(":"), str(new).partition(":")
        return old_prefix.lower() == new_prefix.lower() and resolved(old_root) == resolved(new_root)
    if name == "tuner":
        return old == new or resolved(old) == resolved(new)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    return old == new


def resolved(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def settings_given(cfg: RunConfig) -> set[str]:
    """The settings a library caller chose: those not at their default value."""
    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    return {f.name for f in dataclasses.fields(cfg)
            if default(f) is dataclasses.MISSING or not same_setting(f.name, default(f), getattr(cfg, f.name))}


def resumed_config(cfg: RunConfig, saved: dict, given: set[str]) -> RunConfig:
    """The run's own settings, with the safe ones among those the user `given`.

    Changing any other setting is refused in one line: the checkpoint's weights and optimizer state belong to them.
    """
    merged = {}
    for name in (f.name for f in dataclasses.fields(cfg)):
        new, old = getattr(cfg, name), saved.get(name, getattr(cfg, name))
        if name in ("output", "resume") or (name in given and name in cfg.SAFE_ON_RESUME):
            merged[name] = new
        elif name in given and not same_setting(name, old, new):
            raise UserError(f"--resume: this run was started with {name}={old!r}, not {new!r}; resume with the same "
                            "settings (or leave them out) or start a new --output")
        else:
            merged[name] = old
    return type(cfg)(**merged)


def require_trackers(report_to: str) -> list[str]:
    """The trackers --report-to names, each checked importable before a run writes anything."""
    for name in TRACKERS[report_to]:
        try:
            importlib.import_module(TRACKER_MODULES[name])
        except ImportError:
            raise UserError(f"--report-to {report_to} needs the {name} package: pip install {name} "
                            "(or --report-to none)") from None
    return list(TRACKERS[report_to])


def tracker_config(record: dict) -> dict:
    """The run's settings as trackers take them (TensorBoard's hparams hold only numbers, strings and booleans)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in record.items()}
