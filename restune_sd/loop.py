"""The training scaffold that `restune-sd train` (diffusion) and `restune-sd classify train` share.

A job brings its model with the tuner attached, its data and its loss (`Job`); `fit` does the rest: accelerate,
the optimizer (optimizers.py), the schedule and the EMA (ema.py), the step loop with metrics, progress, checkpoints,
the NaN stop and the weights check (divergence.py), the final tuner and the results. The run folder's life (lock,
take-over) is runfolder.py's, the checkpoints checkpoints.py's, the settings runconfig.py's and the sample stream
streams.py's. Every random draw is a pure function of the seed, the step and the sample's position in the global
batch, so a resumed run and a run split over N processes see the same numbers as one uninterrupted process with the
combined batch.
"""

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from restune_sd.config import TuningConfig, resolve_tuner
from restune_sd.divergence import require_sound_weights, stop_on_nan
from restune_sd.ema import TunerEMA, ema_folder
from restune_sd.errors import UserError
from restune_sd.files import warn, write_text_atomic, writing
from restune_sd.kernels import SLOW_BF16, slow_cpu_bf16
from restune_sd.optimizers import build_optimizer, require_optimizer
from restune_sd.runconfig import (PROJECT, WHOLE, RunConfig, lr_schedule, require_trackers,  # noqa: F401 (WHOLE: jobs)
                                  resumed_config, settings_given, tracker_config)
from restune_sd.checkpoints import checkpoint_state, disk_hint, save_checkpoint, set_rng_state, write_tuner
from restune_sd.runfolder import (FolderLock, RunPlan, clear_stale, finished_results, locate_run, main_process, read_marker,
                                  read_metrics, write_marker)
from restune_sd.streams import StepBatches, sample_stream, seeded  # noqa: F401  (seeded: the jobs' draws)
from restune_sd.summary import parameter_summary
from restune_sd.text_encoder_lora import average_gradients, outside_parameters, tuned_parameters


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
    totals: Callable[[], dict[str, int]] | None = None  # every process's counts, summed into the results
    tuner_extra: dict = field(default_factory=dict)  # more fields for the saved tuner's config
    # Optimizer param groups of trainable weights outside `model`, each with its own lr (the text encoder's LoRA):
    # checkpointed and saved with the tuner as restune_sd.text_encoder_lora.tuned_parameters names them.
    param_groups: list[dict] = field(default_factory=list)
    trains: torch.nn.Module | None = None  # what the loss calls, and accelerate prepares, instead of `model` (cached taps)
    # Each sample's loss before `loss` averages it ([B]; [K, B] from a sweep's K variants): what a sweep splits by variant.
    sample_losses: Callable[[torch.nn.Module, dict, int], torch.Tensor] | None = None
    sweep: object = None  # restune_sd.sweep.Sweep: K variants' param groups, schedules, clipping and tuner folders

    @property
    def called(self) -> torch.nn.Module:
        return self.model if self.trains is None else self.trains

    def optimizer_groups(self, inside: list) -> list:
        """The optimizer's parameters: one group per sweep variant, else the model's with the job's own groups."""
        own = [{"params": inside}, *self.param_groups] if self.param_groups else inside
        return self.sweep.param_groups(inside) if self.sweep else own

    def tuner_writer(self) -> Callable:
        """(folder, extra, hint, ema) -> writes the tuner folder: a sweep's variants each in a sub-folder of it."""
        return self.sweep.write_tuners if self.sweep else lambda *args: write_tuner(self.model, *args)


def require_writable(run: Path) -> None:
    """Fail in a second, not after the model has loaded, when --output lies where nothing can be written."""
    existing = next(p for p in (run, *run.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write the run directory {run} ({existing} is not a writable folder): "
                        "choose an --output where you can write")


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process


def tuner_state_dict(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in tuned_parameters(model).items()}


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
    ema: TunerEMA | None = None  # the trainable weights' moving average (--ema), set once the optimizer is built

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

    plan = locate_run(cfg.output, cfg.resume, early_files)  # every process checks before anything is written
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
    if cfg.mixed_precision == "bf16" and slow_cpu_bf16(accelerator.device) and accelerator.is_main_process:
        warn(SLOW_BF16)
    require_optimizer(cfg, accelerator.device, accelerator.is_main_process)
    require_writable(plan.run)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    return plan, Session(cfg, tuning, accelerator, accelerator.device, dtype, plan.run)


def fit(cfg: RunConfig, backbone: str, build: Callable[[Session], Job], given: set[str] | None = None,
        early_files: tuple[str, ...] = ()) -> dict:
    """Run (or resume) a training job; returns the results also written to RUN_DIR/results.json.

    The writing process holds the run folder's lock from before it reads the folder to the end, so two commands never
    write one run. On resume every setting comes from the checkpoint; `given` names the ones the user set (default:
    those not at their default value), and only the config's SAFE_ON_RESUME ones may differ.
    """
    lock = FolderLock(Path(cfg.output), "--output") if main_process() else None
    if lock:
        lock.acquire()
    failed = True
    try:
        results = run_job(cfg, backbone, build, given, early_files)
        failed = False
        return results
    finally:
        if lock:
            lock.release(failed=failed)


def run_job(cfg: RunConfig, backbone: str, build: Callable[[Session], Job], given: set[str] | None,
            early_files: tuple[str, ...]) -> dict:
    plan, session = start(cfg, backbone, early_files, given)
    job = build(session)
    cfg, accelerator = session.cfg, session.accelerator
    model = job.model
    keep_trainables_fp32(model, session.tuning, session.dtype)
    inside = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(job.optimizer_groups(inside), cfg)
    params = inside + outside_parameters(job)
    session.ema = TunerEMA(params, cfg) if cfg.ema else None
    global_batch = cfg.batch_size * accelerator.num_processes
    stream = sample_stream(job.dataset, cfg.seed, global_batch * cfg.gradient_accumulation)
    steps_per_epoch = max(1, stream.epoch_size // (global_batch * cfg.gradient_accumulation))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup(steps_per_epoch)
    if warmup >= total_steps > 1 and accelerator.is_main_process:
        warn(f"the warm-up ({warmup} steps) is as long as the run ({total_steps} steps) or longer, so the learning "
             "rate never reaches --learning-rate: lower --warmup-steps (or --warmup-epochs) or raise --max-steps")
    scheduler = (job.sweep.schedule(optimizer, total_steps, steps_per_epoch) if job.sweep else
                 lr_schedule(optimizer, cfg, total_steps, warmup))
    wrapped, optimizer = accelerator.prepare(job.called, optimizer)
    first = restore(plan, model, optimizer, scheduler, session.ema)
    if first > total_steps or (first == total_steps and finished_results(plan.run, total_steps)):
        raise UserError(f"--resume: the run already finished at step {first} of {total_steps}; raise --max-steps to go on")
    summary = parameter_summary(job.model)
    job.record.update({k: summary[k] for k in ("tuner_params", "head_params", "trainable_params", "total_params")})
    open_run(plan, session, job, total_steps)
    if job.prepare and first < total_steps:
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


def restore(plan: RunPlan, model, optimizer, scheduler, ema: TunerEMA | None) -> int:
    """Load a checkpoint's tuner weights (first: restoring only the optimizer is a known bug), optimizer, schedule,
    EMA and RNGs; the step it resumes at (0 for a fresh run)."""
    if plan.state is None:
        return 0
    current = tuned_parameters(model)
    if set(plan.state["tuner"]) != set(current):
        raise UserError(f"checkpoint {plan.checkpoint} holds other tuner weights than this run's tuner; start a new --output")
    with torch.no_grad():
        for name, tensor in plan.state["tuner"].items():
            if tensor.shape != current[name].shape:
                raise UserError(f"checkpoint {plan.checkpoint}: {name} has shape {tuple(tensor.shape)}, not "
                                f"{tuple(current[name].shape)}; start a new --output")
            current[name].copy_(tensor)
    optimizer.load_state_dict(plan.state["optimizer"])
    scheduler.load_state_dict(plan.state["scheduler"])
    if ema:
        ema.load_state_dict(plan.state.get("ema"), plan.checkpoint)
    set_rng_state(plan.state["rng"])
    return plan.state["step"]


def open_run(plan: RunPlan, session: Session, job: Job, total_steps: int) -> None:
    """The first write: everything before it failed without leaving anything behind. The marker goes first (it proves
    restune-sd made the folder), then config.json, which records the run."""
    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if plan.state is None:
            clear_stale(plan)
        elif read_marker(plan.run) is None:  # a run of restune-sd before 0.2, resumed: mark it as ours now
            write_marker(plan.run, plan.run_id)
        record = {**dataclasses.asdict(session.cfg), "tuning": session.tuning.to_dict(), **job.record,
                  "num_processes": accelerator.num_processes, "dataset_size": len(job.dataset), "total_steps": total_steps}
        write_text_atomic(plan.run / "config.json", json.dumps(record, indent=2) + "\n")
        with writing(plan.run, "choose an --output where you can write, or --report-to none"):
            accelerator.init_trackers(PROJECT, config=tracker_config(record),
                                      init_kwargs={"wandb": {"name": plan.run.name, "dir": str(plan.run)}})
    accelerator.wait_for_everyone()


def steps(plan, session, job, wrapped, params, optimizer, scheduler, loader, first: int, total_steps: int):
    """The step loop: micro-batches, backward, clipping, the optimizer, the EMA, the schedule; metrics, progress,
    checkpoints, NaN stop."""
    from tqdm.auto import tqdm

    cfg, accelerator, run = session.cfg, session.accelerator, plan.run
    history = [h for h in read_metrics(run / "metrics.jsonl") if h["step"] <= first]
    if accelerator.is_main_process:
        write_text_atomic(run / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    last_checkpoint = plan.checkpoint  # a resumed run's checkpoint is its last good one until it writes another
    if first == total_steps:  # resumed at its last step (killed while ending): log that step if it was not, then end
        if (not history or history[-1]["step"] < first) and accelerator.is_main_process:
            history.append(end_step(session, job, {**plan.state.get("entry", {}), "step": first}, last_checkpoint, True))
        return history, last_checkpoint, set()
    progress = tqdm(total=total_steps, initial=first, desc="train", unit="step", disable=not accelerator.is_main_process)
    wrapped.train()
    batches = iter(loader)
    corrupt = set()  # counted here, not in the dataset: DataLoader workers each hold their own copy of it
    size = len(job.dataset)
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
                    if accelerator.sync_gradients:
                        average_gradients(accelerator, outside_parameters(job))
                    if accelerator.sync_gradients and job.sweep:  # each variant by its own norm, not a joint one
                        job.sweep.clip(accelerator)
                    elif accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / cfg.gradient_accumulation
            if session.ema:
                session.ema.step()
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step's update used
            scheduler.step()
            stop_on_nan(step_loss, step, first, last_checkpoint)
            entry = {"step": step + 1, "loss": step_loss, "lr": learning_rate,
                     "seconds_per_step": time.time() - tick, "peak_memory_mb": peak_memory_mb(session.device)}
            saving = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if saving or step + 1 == total_steps:
                require_sound_weights(session, job, params, batch, step, last_checkpoint)
            if accelerator.is_main_process:
                if saving:
                    state = checkpoint_state(step + 1, tuner_state_dict(job.model), optimizer, scheduler, cfg,
                                             session.tuning, plan.run_id, entry, session.ema)
                    last_checkpoint = save_checkpoint(run, step + 1, state, job.tuner_writer(), cfg.keep_checkpoints,
                                                      last_checkpoint, {"data": cfg.data, **job.tuner_extra}, session.ema)
                entry = end_step(session, job, entry, last_checkpoint, step + 1 == total_steps)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{entry['lr']:.2e}")
                progress.update(1)
            history.append(entry)
            accelerator.wait_for_everyone()
    finally:
        progress.close()
    return history, last_checkpoint, corrupt


def end_step(session: Session, job: Job, entry: dict, last_checkpoint: Path | None, final: bool) -> dict:
    """After a step and its checkpoint (main process): the job's extras (validation), then the metrics line and trackers."""
    step, path = entry["step"], session.run / "metrics.jsonl"
    if job.on_step:
        entry = {**entry, **(job.on_step(step, last_checkpoint, final) or {})}
    with writing(path, disk_hint(last_checkpoint)), path.open("a") as log:
        log.write(json.dumps(entry) + "\n")
    session.log({k: v for k, v in entry.items() if k != "step"}, step)
    return entry


def finish(plan, session, job, history, last_checkpoint, corrupt, total_steps: int, seconds: float) -> dict:
    """The final tuner, the loss curve and results.json (main process); the results."""
    from accelerate.utils import gather_object

    from restune_sd.plots import loss_curve_png

    accelerator, run, cfg = session.accelerator, plan.run, session.cfg
    corrupt = set().union(*gather_object([corrupt]))
    counts = gather_object([job.totals()]) if job.totals else [{}]
    results = {}
    if accelerator.is_main_process:
        if summary_line := job.dataset.corrupt_summary(corrupt):
            warn(summary_line)
        hint = disk_hint(last_checkpoint)
        tuner_dir = run / "tuner"  # a resumed run replaces the final tuner of its earlier, shorter end
        job.tuner_writer()(tuner_dir, {"trained_steps": total_steps, "data": cfg.data, **job.tuner_extra}, hint,
                    session.ema)
        with writing(run / "loss.png", hint):
            loss_curve_png([h["step"] for h in history], [h.get("loss", math.nan) for h in history], run / "loss.png")
        timed = [h["seconds_per_step"] for h in history[1:] if "seconds_per_step" in h] or [
            h["seconds_per_step"] for h in history if "seconds_per_step" in h]
        results = {
            "steps": total_steps, "final_loss": history[-1].get("loss") if history else None,
            "mean_loss_last_10": sum(h.get("loss", 0.0) for h in history[-10:]) / max(1, len(history[-10:])),
            "seconds_per_step": sum(timed) / max(1, len(timed)),
            "peak_memory_mb": max((h.get("peak_memory_mb", 0.0) for h in history), default=0.0),
            "wall_seconds": seconds, "tuner_dir": str(tuner_dir), "num_processes": accelerator.num_processes, **job.record,
            **({"ema_tuner_dir": str(ema_folder(tuner_dir))} if session.ema else {}),
            **{name: sum(each[name] for each in counts) for name in counts[0]},
        }
        if job.finish:
            results.update(job.finish(job.model))
        write_text_atomic(run / "results.json", json.dumps(results, indent=2) + "\n", hint)
    accelerator.wait_for_everyone()
    return results
