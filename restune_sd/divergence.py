"""A run that diverged stops with one line naming its last good checkpoint, before anything non-finite is saved: the
loss checked at every step, the weights (and their EMA) before every checkpoint and the final save. `session` and
`job` are loop.py's Session and Job."""

import math
from pathlib import Path

import torch

from restune_sd.errors import UserError


def require_sound_weights(session, job, params, batch: dict, step: int, last_checkpoint) -> None:
    """Before a checkpoint or the final save, on every process: the trainable weights and their EMA are finite, and the
    weights give a finite loss on the step's last micro-batch (one huge update can leave finite weights whose output
    overflows)."""
    accelerator = session.accelerator
    sound = all(bool(torch.isfinite(p).all()) for p in params) and (session.ema is None or session.ema.finite())
    if sound:  # the unwrapped model: a distributed wrapper's forward on one rank alone could wait for the others
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), accelerator.autocast():
            sound = bool(torch.isfinite(job.loss(job.called, batch, step)).all())
    if accelerator.reduce(torch.tensor(float(not sound), device=session.device), reduction="sum").item():
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        raise UserError(f"the trainable weights diverged by step {step + 1} (non-finite weights or EMA weights, or a "
                        f"non-finite loss with them); stopped without saving them ({kept}). Lower --learning-rate or "
                        "use bf16/fp32")


def stop_on_nan(step_loss: float, step: int, first: int, last_checkpoint: Path | None) -> None:
    if math.isfinite(step_loss):
        return
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    if step == first:  # before any update the learning rate cannot be the cause
        raise UserError(f"loss became {step_loss} at step {step + 1}, before any update; stopped ({kept}). "
                        "The model, the tuner's weights or config (e.g. a non-finite scale) or the data give it")
    raise UserError(f"loss became {step_loss} at step {step + 1}; stopped ({kept}). Lower --learning-rate or use bf16/fp32")
