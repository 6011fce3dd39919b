"""An exponential moving average of the trainable weights (`--ema`), kept by diffusers' EMAModel: updated after every
optimizer step, carried in every checkpoint, and saved beside each tuner as a tuner of the same format (FOLDER-ema)."""

import contextlib
import dataclasses

import torch

from restune_sd.bounds import require_number
from restune_sd.errors import UserError

EMA_FIELDS = ("ema_decay", "ema_warmup", "ema_power")


def check_ema_settings(cfg) -> None:
    """--ema-decay in [0, 1) (0: the raw weights); --ema-warmup and --ema-power only with --ema, the power only with
    the warm-up whose ramp it shapes."""
    require_number("--ema-decay", cfg.ema_decay, minimum=0, maximum=1)
    if cfg.ema_decay == 1:
        raise UserError("--ema-decay must be below 1 (at 1 the average never leaves the initial weights), not 1")
    require_number("--ema-power", cfg.ema_power, above=0, maximum=10)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changed = [name for name in EMA_FIELDS if getattr(cfg, name) != defaults[name]]
    if changed and not cfg.ema:
        raise UserError(f"--{changed[0].replace('_', '-')} sets up the EMA of the weights: add --ema")
    if cfg.ema_power != defaults["ema_power"] and not cfg.ema_warmup:
        raise UserError("--ema-power shapes the decay's warm-up ramp: add --ema-warmup")


def ema_folder(folder):
    """Where the averaged weights of the tuner written to `folder` go: RUN/tuner-ema, step-XXXXXXXX-tuner-ema."""
    return folder.with_name(f"{folder.name}-ema")


class TunerEMA:
    """The moving average of `params`, as diffusers' EMAModel keeps it: the decay at optimizer step t (counted from 1)
    is 0 at t = 1, then min(--ema-decay, (1 + s) / (10 + s)) with s = t - 1, or with --ema-warmup
    min(--ema-decay, 1 - (1 + s) ** -power)."""

    def __init__(self, params: list, cfg):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.average = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, power=cfg.ema_power)

    def step(self) -> None:
        """After an optimizer step."""
        self.average.step(self.params)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(s).all()) for s in self.average.shadow_params)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model inside the block (to save or validate them); the trained ones, exactly,
        after it."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def state_dict(self) -> dict:
        """Plain values and tensors (checkpoints load with weights_only=True)."""
        return self.average.state_dict()

    def load_state_dict(self, state: dict | None, checkpoint) -> None:
        """The average a checkpoint holds; one line when it holds none, or one for other weights."""
        shadows = (state or {}).get("shadow_params")
        if not isinstance(shadows, list) or len(shadows) != len(self.params) or any(
                not isinstance(s, torch.Tensor) or s.shape != p.shape for s, p in zip(shadows, self.params)):
            raise UserError(f"checkpoint {checkpoint} holds no EMA of this run's weights; start a new --output")
        try:
            self.average.load_state_dict(state)
        except ValueError as error:
            raise UserError(f"checkpoint {checkpoint}: its EMA state is damaged ({error})") from None
        self.average.shadow_params = [s.to(p.device, p.dtype) for s, p in zip(self.average.shadow_params, self.params)]
