"""Validation during a diffusion training run: the prompts (with kohya's per-line options), the images drawn as
`restune-sd sample` draws them, the held-out denoising loss, and the job's on_step hook that writes and logs them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from restune_sd.encoders import Encoders
from restune_sd.errors import UserError
from restune_sd.files import writing
from restune_sd.loop import Session, disk_hint
from restune_sd.prompts import Prompt, draw_settings, pipeline_arguments, read_prompt_file
from restune_sd.trained_with import call_settings, scheduler_config

if TYPE_CHECKING:
    from restune_sd.train import Components, TrainConfig

def read_validation_prompts(cfg: TrainConfig) -> list[Prompt]:
    """The --validation-prompt prompts (as written), then those of --validation-prompts-file: one a line with kohya's
    per-line options (restune_sd.prompts), blank lines and # comments skipped."""
    prompts = [Prompt(p) for p in cfg.validation_prompts]
    if not cfg.validation_prompts_file:
        return prompts
    path = Path(cfg.validation_prompts_file)
    lines = read_prompt_file(path, "--validation-prompts-file", errors="replace")
    if not lines:
        raise UserError(f"--validation-prompts-file {path} holds no prompt: write one prompt a line")
    return prompts + lines


def validation_defaults(cfg: TrainConfig) -> dict:
    """What validation images are drawn with where a prompt's line does not say (restune_sd.prompts.draw_settings)."""
    return {"negative_prompt": cfg.validation_negative_prompt, "width": cfg.validation_width or cfg.resolution,
            "height": cfg.validation_height or cfg.resolution, "guidance_scale": cfg.validation_guidance_scale,
            "steps": cfg.validation_steps, "scheduler": cfg.validation_scheduler,
            "karras_sigmas": cfg.validation_karras_sigmas}


def held_out_split(cfg: TrainConfig) -> str:
    """--validation-split, or by default the data set's val split where its layout has one (else its only one, train)."""
    from restune_sd.datasets.build import REGISTRY

    layout = REGISTRY.get(cfg.validation_data.partition(":")[0].lower())
    return cfg.validation_split or ("val" if layout and "val" in layout.splits else "train")


def components_pipeline(comps: Components, unet):
    """A StableDiffusionPipeline of a run's loaded parts around `unet`, without a progress bar, built as `sample`
    builds its own (validation images, and prior preservation's class images with the frozen UNet)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    # A copy of the model's scheduler, as `sample` has: the pipeline's constructor rewrites the one it is given.
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=unet,
                                   scheduler=DDPMScheduler.from_config(comps.noise_scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_images(comps: Components, unet, cfg: TrainConfig, prompts: list[Prompt], device, step: int) -> list[list]:
    """--validation-images images per prompt (rows = prompts); image i from seed + i (a line's --d D: D + i), as
    `restune-sd sample` draws it: the same scheduler, predicting what training predicts, with the run's clip skip and
    zero terminal SNR, and the --validation-* settings under each prompt line's own. A NaN or infinite image is a
    UserError."""
    from restune_sd.sample import draw, use_scheduler
    from restune_sd.train import prediction_target

    pipe = components_pipeline(comps, unet)
    model_scheduler = scheduler_config(pipe.scheduler.config, cfg.zero_terminal_snr)
    prediction = prediction_target(comps.noise_scheduler)
    trained = {"clip_skip": cfg.clip_skip, "zero_terminal_snr": cfg.zero_terminal_snr}
    rows = []
    for p, prompt in enumerate(prompts):
        chosen = draw_settings(prompt, validation_defaults(cfg))
        use_scheduler(pipe, chosen["scheduler"], prediction, chosen["karras_sigmas"], model_scheduler)
        seed = cfg.seed if prompt.seed is None else prompt.seed
        generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(cfg.validation_images)]
        images, non_finite = draw(pipe, [prompt.text] * cfg.validation_images, generators,
                                  **pipeline_arguments(chosen, cfg.validation_images), **call_settings(trained))
        if non_finite:
            raise UserError(f"validation image {non_finite[0]} of prompt {p} ({prompt.text!r}) at step {step} came out NaN or "
                            "infinite, so no validation image of this step is written: the tuner's weights have likely "
                            "diverged (try a lower --learning-rate), or the model overflows in half precision (try "
                            "--mixed-precision no)")
        rows.append(images)
    return rows


VALIDATION_DRAW = -1  # the `step` of the validation loss's draws: no training step has it, and it never changes


@torch.no_grad()
def validation_loss(unet, encoders: Encoders, held_out, cfg: TrainConfig, device) -> float:
    """The denoising loss on up to --validation-samples held-out images spread over the set, its noise and timesteps
    drawn from each image's index alone, so that the figure is comparable from one validation to the next."""
    from restune_sd.train import diffusion_loss

    count = min(cfg.validation_samples, len(held_out))
    chosen = [i * len(held_out) // count for i in range(count)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(held_out, chosen), batch_size=cfg.batch_size)
    total = 0.0
    for batch in loader:
        batch["position"] = batch["index"]
        total += diffusion_loss(unet, encoders, batch, cfg, VALIDATION_DRAW, device).item() * len(batch["index"])
    return total / count


def held_out_data(cfg: TrainConfig, resolution: int):
    """The --validation-data set (None without it): centre crops, no flips, no caption dropout, the same at every look."""
    from restune_sd.datasets import build_dataset

    if not cfg.validation_data:
        return None
    return build_dataset(cfg.validation_data, split=held_out_split(cfg), resolution=resolution, center_crop=True,
                         caption_template=cfg.caption_template, seed=cfg.seed, caption_extension=cfg.caption_extension,
                         image_column=cfg.image_column, caption_column=cfg.caption_column)


def validator(session: Session, comps: Components, unet, prompts: list[str], held_out):
    """The job's on_step: every --validation-every steps and at the last, the validation images (written under
    RUN_DIR/validation/step-XXXXXXXX/ and logged) and the held-out loss (returned as that step's metric), with the
    EMA weights under --validation-ema."""
    from restune_sd.images import write_validation_folder

    cfg = session.cfg
    # Uncached: held-out indices would meet the training cache's keys.
    encoders = Encoders(comps, session.dtype, clip_skip=cfg.clip_skip)

    def validate(step: int, last_checkpoint, final: bool) -> dict:
        due = final or (cfg.validation_every and step % cfg.validation_every == 0)
        if not due or not (prompts or held_out is not None):
            return {}
        was_training, metrics, rows = unet.training, {}, []
        unet.eval()
        weights = session.ema.applied() if cfg.validation_ema else contextlib.nullcontext()
        with session.accelerator.autocast(), weights:
            if held_out is not None:
                metrics["validation_loss"] = validation_loss(unet, encoders, held_out, cfg, session.device)
            if prompts:
                rows = validation_images(comps, unet, cfg, prompts, session.device, step)
        unet.train(was_training)
        if rows:
            with writing(session.run / "validation", disk_hint(last_checkpoint)):
                write_validation_folder(rows, [p.line or p.text for p in prompts], session.run / "validation" / f"step-{step:08d}")
            session.log_images({f"validation/prompt-{p:03d}": row for p, row in enumerate(rows)}, step)
        return metrics

    return validate
