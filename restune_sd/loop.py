"""The training scaffold that `restune-sd train` (diffusion) and `restune-sd classify train` share.

A job brings its model with the tuner attached, its data and its loss (`Job`); `fit` does the rest: the run
folder and resume, accelerate, the seeded sample stream, AdamW and the schedule, the step loop with metrics,
progress, checkpoints and the NaN stop, the final tuner and the results. Every random draw is a pure function of
the seed, the step and the sample's position in the global batch, so a resumed run and a run split over N
processes see the same numbers as one uninterrupted process with the combined batch.
"""

import dataclasses
import importlib
import json
import math
import os
import pickle
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from restune_sd.bounds import check_bounds, require_number
from restune_sd.config import TuningConfig, resolve_tuner
from restune_sd.errors import UserError
from restune_sd.files import warn, write_atomic, write_text_atomic, writing
from restune_sd.summary import parameter_summary

CHECKPOINTS = "checkpoints"
# diffusers.optimization.get_scheduler's schedules (checked here without importing diffusers).
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                "piecewise_constant")
CHECKPOINT_KEYS = ("step", "tuner", "optimizer", "scheduler", "rng", "config", "tuning")
TRACKERS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb"), "none": ()}
TRACKER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
PROJECT = "restune-sd"  # the wandb project; TensorBoard logs go to RUN_DIR/tensorboard/restune-sd/
WHOLE = {"integer": True}


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
        "epochs": {**WHOLE, "minimum": 1}, "batch_size": {**WHOLE, "minimum": 1},
        "gradient_accumulation": {**WHOLE, "minimum": 1}, "max_steps": {**WHOLE, "minimum": 1, "optional": True},
        "warmup_steps": {**WHOLE, "minimum": 0}, "learning_rate": {"above": 0}, "weight_decay": {"minimum": 0},
        "adam_epsilon": {"above": 0}, "max_grad_norm": {"minimum": 0}, "seed": {**WHOLE, "minimum": 0},
        "checkpoint_every": {**WHOLE, "minimum": 0}, "keep_checkpoints": {**WHOLE, "minimum": 1},
        "num_workers": {**WHOLE, "minimum": 0}, "lr_num_cycles": {**WHOLE, "minimum": 1}, "lr_power": {"above": 0},
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
        if self.tensorboard:  # the older flag, folded in so config.json records one setting
            self.report_to, self.tensorboard = "all" if self.report_to in ("wandb", "all") else "tensorboard", False
        check_bounds(self, self.BOUNDS)
        if len(self.adam_betas) != 2:
            raise UserError(f"adam_betas must be two numbers, not {self.adam_betas!r}")
        for beta in self.adam_betas:
            require_number("adam_betas", beta, minimum=0, maximum=0.9999999)

    def warmup(self, steps_per_epoch: int) -> int:
        """Warm-up length in optimizer steps."""
        return self.warmup_steps


@dataclass
class Job:
    """What one kind of training brings to `fit`: the tuned model, its data and its loss, and optional extras."""

    model: torch.nn.Module  # tuner attached; the trainable parameters are those that require grad
    dataset: torch.utils.data.Dataset  # items with "index" and "skipped" (corrupt images passed over)
    loss: Callable[[torch.nn.Module, dict, int], torch.Tensor]  # (model, batch, step) -> scalar loss
    record: dict = field(default_factory=dict)  # more fields for config.json and results.json
    prepare: Callable[[], None] | None = None  # every process, after the run folder is made, before the first step
    # Main process, after each step and its checkpoint: (step, last checkpoint, final step?) -> more metrics for that step.
    on_step: Callable[[int, Path | None, bool], dict | None] | None = None
    finish: Callable[[torch.nn.Module], dict] | None = None  # main process, after training: more results
    tuner_extra: dict = field(default_factory=dict)  # more fields for the saved tuner's config


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


def seeded(*parts: int) -> torch.Generator:
    """A generator whose seed mixes integers, for draws that must not depend on process layout or history."""
    mixed = 0x9E3779B97F4A7C15
    for part in parts:
        mixed = (mixed ^ (int(part) + 0x632BE59BD9B4E019 + (mixed << 6) + (mixed >> 2))) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(mixed)


class SampleStream(torch.utils.data.Dataset):
    """Position p of an endless stream: epoch p // N, the p % N-th item of that epoch's seeded permutation."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.epoch_size = len(dataset)  # stream positions per epoch
        self._perms = {}

    def locate(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=seeded(self.seed, epoch))}
        return epoch, int(self._perms[epoch][offset])

    def __len__(self):
        return 2**62

    def __getitem__(self, position: int):
        epoch, index = self.locate(position)
        self.dataset.set_epoch(epoch)
        item = dict(self.dataset[index])
        item["position"], item["index"] = position, index
        return item


class BucketStream(SampleStream):
    """The stream of a dataset with aspect-ratio `buckets`: the `group` samples of each optimizer step share a bucket.

    An epoch shuffles each bucket, cuts it into groups (the last one filled up by wrapping round the bucket, so every
    image is seen) and shuffles the groups; all seeded by (seed, epoch), so resumed and N-process runs see the same
    order. Only the current epoch's order is held.
    """

    def __init__(self, dataset, seed: int, group: int):
        super().__init__(dataset, seed)
        self.group, self.members = group, dataset.buckets.members()
        self.epoch_size = group * sum(math.ceil(len(members) / group) for members in self.members)
        self._orders = {}

    def locate(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.epoch_size)
        if epoch not in self._orders:
            self._orders = {epoch: self.order(epoch)}
        indices, start = self._orders[epoch][offset // self.group]
        return epoch, indices[(start + offset % self.group) % len(indices)]

    def order(self, epoch: int) -> list[tuple[list[int], int]]:
        """The epoch's groups in turn, each as (its bucket's indices in shuffled order, where the group starts)."""
        shuffled = [[members[i] for i in torch.randperm(len(members), generator=seeded(self.seed, epoch, b)).tolist()]
                    for b, members in enumerate(self.members)]
        groups = [(indices, start) for indices in shuffled for start in range(0, len(indices), self.group)]
        return [groups[i] for i in torch.randperm(len(groups), generator=seeded(self.seed, epoch)).tolist()]


def sample_stream(dataset, seed: int, group: int) -> SampleStream:
    """The stream of a job's data: bucketed when the dataset has `buckets`, each step's `group` samples from one."""
    return BucketStream(dataset, seed, group) if getattr(dataset, "buckets", None) else SampleStream(dataset, seed)


class StepBatches(torch.utils.data.Sampler):
    """This process's micro-batches from step `start` to `total`: slices of each global batch in stream order.

    Each step's indices are computed from the step, so nothing is built up front for the whole run.
    """

    def __init__(self, start: int, total: int, accumulation: int, global_batch: int, rank: int, batch: int):
        self.start, self.total, self.accumulation = start, total, accumulation
        self.global_batch, self.rank, self.batch = global_batch, rank, batch

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in range(self.accumulation):
                first = (step * self.accumulation + micro) * self.global_batch + self.rank * self.batch
                yield list(range(first, first + self.batch))

    def __len__(self):
        return (self.total - self.start) * self.accumulation


@dataclass
class RunPlan:
    """Where a run writes and what it resumes: the checkpoint's path and contents, or stale files to clear first."""

    run: Path
    checkpoint: Path | None = None
    state: dict | None = None
    stale: list[Path] = field(default_factory=list)


def locate_run(cfg: RunConfig, early_files: tuple[str, ...]) -> RunPlan:
    """The run directory and the checkpoint to resume from (none for a fresh run); reads only, never writes."""
    run = Path(cfg.output)
    if cfg.resume is None:
        if run.exists() and not run.is_dir():
            raise UserError(f"{run} is a file: choose a new --output folder")
        held = sorted(run.iterdir()) if run.is_dir() else []
        if held and not abandoned_attempt(run, held, early_files):
            raise UserError(f"{run} already holds files: choose a new --output, or pass --resume latest to continue it")
        if held:
            warn(f"{run} holds an earlier attempt that stopped before its first checkpoint: starting it over")
        return RunPlan(run, stale=held)
    if cfg.resume == "latest":
        found = sorted((run / CHECKPOINTS).glob("step-*.pt")) if (run / CHECKPOINTS).is_dir() else []
        if not found:
            raise UserError(f"--resume latest: {run / CHECKPOINTS} holds no checkpoint to resume from; run again without "
                            "--resume to start over (an attempt that stopped before its first checkpoint is taken over)")
        damaged = []
        for checkpoint in reversed(found):
            try:
                state = load_checkpoint(checkpoint)
            except UserError as error:
                damaged.append(str(error))
                continue
            for reason in damaged:
                warn(f"{reason}; resuming from {checkpoint.name}, the newest intact checkpoint")
            return RunPlan(run, checkpoint, state)
        raise UserError(f"--resume latest: no checkpoint in {run / CHECKPOINTS} can be used ({damaged[0]}); "
                        "start a new --output")
    checkpoint = Path(cfg.resume)
    if not checkpoint.is_file():
        raise UserError(f"--resume {checkpoint}: no such checkpoint file (use latest, or a step-*.pt file)")
    return RunPlan(run, checkpoint, load_checkpoint(checkpoint))


def abandoned_attempt(run: Path, held: list[Path], early_files: tuple[str, ...]) -> bool:
    """Only files a run writes before its first checkpoint, and no checkpoint: nothing a retry could lose."""
    names = {p.name for p in held if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    early = {"config.json", "metrics.jsonl", CHECKPOINTS, "tensorboard", "wandb", *early_files}
    if "config.json" not in names or not names <= early:
        return False
    return not any((run / CHECKPOINTS).glob("step-*.pt"))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, read without running any code it may carry; a UserError says why it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise UserError(f"checkpoint {path} holds objects that could run code when loaded, so it is not loaded") from None
        raise UserError(f"checkpoint {path} is damaged ({str(error).splitlines()[0]})") from None
    except Exception as error:  # a truncated or empty file: torch raises RuntimeError, EOFError, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"checkpoint {path} is damaged ({reason})") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise UserError(f"checkpoint {path} is not a restune-sd checkpoint of this version (it lacks the run's settings)")
    return state


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
    return {f.name for f in dataclasses.fields(cfg)
            if f.default is dataclasses.MISSING or not same_setting(f.name, f.default, getattr(cfg, f.name))}


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


def atomic_torch_save(obj, path: Path, hint: str = "") -> None:
    """Write then rename, so a run killed mid-write (or a full disk) leaves the previous file intact."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp), hint)


def rng_state() -> dict:
    """Every generator the run touches, as tensors and plain values, so a checkpoint loads with weights_only=True."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def require_writable(run: Path) -> None:
    """Fail in a second, not after the model has loaded, when --output lies where nothing can be written."""
    existing = next(p for p in (run, *run.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write the run directory {run} ({existing} is not a writable folder): "
                        "choose an --output where you can write")


def disk_hint(last_checkpoint: Path | None) -> str:
    if last_checkpoint:
        return f"free some space, then --resume latest (the last good checkpoint is {last_checkpoint})"
    return "free some space and run again (the run wrote no checkpoint yet)"


def read_metrics(path: Path) -> list[dict]:
    """The logged steps of an earlier part of the run; a line torn by a kill mid-write is dropped with a warning."""
    if not path.exists():
        return []
    history = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
            history.append({**entry, "step": int(entry["step"])})
        except (ValueError, TypeError, KeyError):
            warn(f"{path} line {number} is damaged and is left out of the loss curve")
    return history


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process


def tuner_state_dict(model) -> dict:
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in model.restune.param_names + model.restune.head_names}


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, cfg: RunConfig, tuning: TuningConfig,
                    last: Path | None, tuner_extra: dict) -> Path:
    """A resumable checkpoint: the tuner, optimizer, schedule, RNGs and the run's settings, as tensors and plain values;
    beside it the tuner as a folder `sample --tuner` loads (step-XXXXXXXX-tuner/), pruned with it."""
    folder = run / CHECKPOINTS
    path = folder / f"step-{step:08d}.pt"
    hint = disk_hint(last)
    with writing(folder, hint):
        folder.mkdir(exist_ok=True)
    atomic_torch_save({"step": step, "tuner": tuner_state_dict(model), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": dataclasses.asdict(cfg),
                       "tuning": tuning.to_dict()}, path, hint)
    write_tuner(model, checkpoint_tuner(path), {"trained_steps": step, **tuner_extra}, hint)
    for old in sorted(folder.glob("step-*.pt"))[:-cfg.keep_checkpoints]:
        old.unlink()
        shutil.rmtree(checkpoint_tuner(old), ignore_errors=True)
    return path


def checkpoint_tuner(checkpoint: Path) -> Path:
    """The loadable tuner folder written with a checkpoint (a name resume's step-*.pt glob never matches)."""
    return checkpoint.with_name(f"{checkpoint.stem}-tuner")


def write_tuner(model, folder: Path, extra: dict, hint: str) -> None:
    """The tuner as `load_tuner` and `sample --tuner` read it, written whole; an earlier one there (a resumed run
    passing the same step again) is replaced."""
    from restune_sd.io import save_tuner

    if folder.exists():
        shutil.rmtree(folder)
    with writing(folder, hint):
        save_tuner(model, folder, extra=extra)


def keep_trainables_fp32(model, tuning: TuningConfig, dtype) -> None:
    """Frozen weights in the compute precision, trainable ones in fp32 (fp16 AdamW cannot unscale fp16 gradients)."""
    if tuning.full or dtype == torch.float32:
        return
    model.to(dtype=dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


@dataclass
class Session:
    """What `fit` hands a job's builder: the settings (resumed ones included), the tuner config and the device."""

    cfg: RunConfig
    tuning: TuningConfig
    accelerator: object
    device: torch.device
    dtype: torch.dtype
    run: Path

    def log(self, values: dict, step: int) -> None:
        """Scalars to every --report-to tracker (main process; nothing with --report-to none)."""
        self.accelerator.log(values, step=step)

    def log_images(self, images: dict[str, list], step: int) -> None:
        """Sets of same-sized PIL images, one set per key, to every tracker (TensorBoard shows each set side by side)."""
        arrays = {key: np.stack([np.asarray(image.convert("RGB")) for image in group]) for key, group in images.items()}
        for tracker in self.accelerator.trackers:
            tracker.log_images(arrays, step=step, **({"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}))


def start(cfg: RunConfig, backbone: str, early_files: tuple[str, ...], given: set[str] | None):
    """Everything before the model loads: the run plan, the resumed settings, the tuner config and accelerate."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    plan = locate_run(cfg, early_files)  # every process checks before anything is written, so none waits on a failed one
    if plan.state is not None:
        given = settings_given(cfg) if given is None else given
        cfg = resumed_config(cfg, plan.state["config"], given)
        tuning = TuningConfig.from_dict(plan.state["tuning"])
        if "tuner" in given and resolve_tuner(cfg.tuner, backbone).to_dict() != tuning.to_dict():
            raise UserError(f"--resume: tuner {cfg.tuner!r} is not the one this run was started with; leave --tuner out")
    else:
        tuning = resolve_tuner(cfg.tuner, backbone)
    trackers = require_trackers(cfg.report_to)
    # accelerate keeps one AcceleratorState per process; each run sets its own precision (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: that is what makes accelerate join several launched processes over gloo.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                              cpu=not torch.cuda.is_available(), log_with=trackers or None,
                              project_config=ProjectConfiguration(project_dir=str(plan.run),
                                                                  logging_dir=str(plan.run / "tensorboard")))
    if cfg.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs a CUDA GPU: use no or bf16 on CPU")
    require_writable(plan.run)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    return plan, Session(cfg, tuning, accelerator, accelerator.device, dtype, plan.run)


def fit(cfg: RunConfig, backbone: str, build: Callable[[Session], Job], given: set[str] | None = None,
        early_files: tuple[str, ...] = ()) -> dict:
    """Run (or resume) a training job; returns the results also written to RUN_DIR/results.json.

    On resume every setting comes from the checkpoint; `given` names the ones the user set (default: those not at
    their default value), and only the config's SAFE_ON_RESUME ones may differ.
    """
    plan, session = start(cfg, backbone, early_files, given)
    job = build(session)
    cfg, accelerator = session.cfg, session.accelerator
    model = job.model
    keep_trainables_fp32(model, session.tuning, session.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  eps=cfg.adam_epsilon)
    global_batch = cfg.batch_size * accelerator.num_processes
    stream = sample_stream(job.dataset, cfg.seed, global_batch * cfg.gradient_accumulation)
    steps_per_epoch = max(1, stream.epoch_size // (global_batch * cfg.gradient_accumulation))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup(steps_per_epoch)
    scheduler = lr_schedule(optimizer, cfg, total_steps, warmup)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    first = restore(plan, model, optimizer, scheduler)
    if first >= total_steps:
        raise UserError(f"--resume: the run already reached step {first} of {total_steps}; raise --max-steps to go on")
    summary = parameter_summary(job.model)
    job.record.update({k: summary[k] for k in ("tuner_params", "head_params", "trainable_params", "total_params")})
    open_run(plan, session, job, total_steps)
    if job.prepare:
        job.prepare()
    loader = torch.utils.data.DataLoader(
        stream, num_workers=cfg.num_workers,
        batch_sampler=StepBatches(first, total_steps, cfg.gradient_accumulation, global_batch,
                                  accelerator.process_index, cfg.batch_size))
    started = time.time()
    try:
        history, last_checkpoint, corrupt = steps(plan, session, job, wrapped, params, optimizer, scheduler, loader,
                                                  first, total_steps)
        return finish(plan, session, job, history, last_checkpoint, corrupt, total_steps, time.time() - started)
    finally:
        # Not accelerator.end_training(): it also ends the process group, which the next run of a process still needs.
        for tracker in accelerator.trackers:
            tracker.finish()


def restore(plan: RunPlan, model, optimizer, scheduler) -> int:
    """Load a checkpoint's tuner weights (first: restoring only the optimizer is a known bug), optimizer, schedule
    and RNGs; the step it resumes at (0 for a fresh run)."""
    if plan.state is None:
        return 0
    current = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in plan.state["tuner"].items():
            current[name].copy_(tensor)
    optimizer.load_state_dict(plan.state["optimizer"])
    scheduler.load_state_dict(plan.state["scheduler"])
    set_rng_state(plan.state["rng"])
    return plan.state["step"]


def open_run(plan: RunPlan, session: Session, job: Job, total_steps: int) -> None:
    """The first write: everything before it failed without leaving anything behind. config.json records the run."""
    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for stale in plan.stale:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        with writing(plan.run, "choose an --output where you can write"):
            plan.run.mkdir(parents=True, exist_ok=True)
        record = {**dataclasses.asdict(session.cfg), "tuning": session.tuning.to_dict(), **job.record,
                  "num_processes": accelerator.num_processes, "dataset_size": len(job.dataset), "total_steps": total_steps}
        write_text_atomic(plan.run / "config.json", json.dumps(record, indent=2) + "\n")
        with writing(plan.run, "choose an --output where you can write, or --report-to none"):
            accelerator.init_trackers(PROJECT, config=tracker_config(record),
                                      init_kwargs={"wandb": {"name": plan.run.name, "dir": str(plan.run)}})
    accelerator.wait_for_everyone()


def steps(plan, session, job, wrapped, params, optimizer, scheduler, loader, first: int, total_steps: int):
    """The step loop: micro-batches, backward, clipping, AdamW, the schedule; metrics, progress, checkpoints, NaN stop."""
    from tqdm.auto import tqdm

    cfg, accelerator, run = session.cfg, session.accelerator, plan.run
    metrics_path = run / "metrics.jsonl"
    history = [h for h in read_metrics(metrics_path) if h["step"] <= first]
    if accelerator.is_main_process:
        write_text_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    progress = tqdm(total=total_steps, initial=first, desc="train", unit="step", disable=not accelerator.is_main_process)
    wrapped.train()
    batches = iter(loader)
    last_checkpoint = plan.checkpoint  # a resumed run's checkpoint is its last good one until it writes another
    corrupt = set()  # counted here, not in the dataset: DataLoader workers each hold their own copy of it
    size = len(job.dataset)
    tuner_extra = {"data": cfg.data, **job.tuner_extra}
    try:  # the bar ends its line, so an error is printed on a line of its own
        for step in range(first, total_steps):
            tick = time.time()
            step_loss = 0.0
            for _ in range(cfg.gradient_accumulation):
                batch = next(batches)
                for asked, skipped in zip(batch["index"].tolist(), batch["skipped"].tolist()):
                    corrupt.update((asked + k) % size for k in range(skipped))
                with accelerator.accumulate(wrapped), accelerator.autocast():
                    loss = job.loss(wrapped, batch, step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / cfg.gradient_accumulation
            scheduler.step()
            stop_on_nan(step_loss, step, first, last_checkpoint)
            entry = {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                     "seconds_per_step": time.time() - tick, "peak_memory_mb": peak_memory_mb(session.device)}
            history.append(entry)
            if accelerator.is_main_process:
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    last_checkpoint = save_checkpoint(run, step + 1, job.model, optimizer, scheduler, cfg,
                                                      session.tuning, last_checkpoint, tuner_extra)
                if job.on_step:
                    entry.update(job.on_step(step + 1, last_checkpoint, step + 1 == total_steps) or {})
                with writing(metrics_path, disk_hint(last_checkpoint)), metrics_path.open("a") as log:
                    log.write(json.dumps(entry) + "\n")
                session.log({k: v for k, v in entry.items() if k != "step"}, step + 1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{entry['lr']:.2e}")
                progress.update(1)
            accelerator.wait_for_everyone()
    finally:
        progress.close()
    return history, last_checkpoint, corrupt


def stop_on_nan(step_loss: float, step: int, first: int, last_checkpoint: Path | None) -> None:
    if math.isfinite(step_loss):
        return
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    if step == first:  # before any update the learning rate cannot be the cause
        raise UserError(f"loss became {step_loss} at step {step + 1}, before any update; stopped ({kept}). "
                        "The model, the tuner's weights or config (e.g. a non-finite scale) or the data give it")
    raise UserError(f"loss became {step_loss} at step {step + 1}; stopped ({kept}). Lower --learning-rate or use bf16/fp32")


def finish(plan, session, job, history, last_checkpoint, corrupt, total_steps: int, seconds: float) -> dict:
    """The final tuner, the loss curve and results.json (main process); the results."""
    from accelerate.utils import gather_object

    from restune_sd.plots import loss_curve_png

    accelerator, run, cfg = session.accelerator, plan.run, session.cfg
    corrupt = set().union(*gather_object([corrupt]))
    results = {}
    if accelerator.is_main_process:
        if summary_line := job.dataset.corrupt_summary(corrupt):
            warn(summary_line)
        hint = disk_hint(last_checkpoint)
        tuner_dir = run / "tuner"  # a resumed run replaces the final tuner of its earlier, shorter end
        write_tuner(job.model, tuner_dir, {"trained_steps": total_steps, "data": cfg.data, **job.tuner_extra}, hint)
        with writing(run / "loss.png", hint):
            loss_curve_png([h["step"] for h in history], [h["loss"] for h in history], run / "loss.png")
        timed = [h["seconds_per_step"] for h in history[1:]] or [h["seconds_per_step"] for h in history]
        results = {
            "steps": total_steps, "final_loss": history[-1]["loss"] if history else None,
            "mean_loss_last_10": sum(h["loss"] for h in history[-10:]) / max(1, len(history[-10:])),
            "seconds_per_step": sum(timed) / max(1, len(timed)), "peak_memory_mb": max(h["peak_memory_mb"] for h in history),
            "wall_seconds": seconds, "tuner_dir": str(tuner_dir), "num_processes": accelerator.num_processes, **job.record,
        }
        if job.finish:
            results.update(job.finish(job.model))
        write_text_atomic(run / "results.json", json.dumps(results, indent=2) + "\n", hint)
    accelerator.wait_for_everyone()
    return results
