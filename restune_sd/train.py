"""Fine-tuning a frozen SD UNet with any tuner: `train(cfg) -> result`, on the shared training scaffold (loop.py).

This module holds what is particular to diffusion: the pipeline's frozen parts and their caches (encoders.py),
the denoising loss (noise, timestep and VAE sample drawn per sample from the seed, the step and the
sample's position) and validation images.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from restune_sd.bounds import MAX_GUIDANCE, MAX_RESOLUTION, require_resolution
from restune_sd.encoders import Encoders, latent_key
from restune_sd.errors import UserError
from restune_sd.kohya_metadata import training_record
from restune_sd.latent_cache import latent_store, require_cache_dir
from restune_sd.loop import WHOLE, Job, RunConfig, Session, fit, seeded
from restune_sd.masked_loss import per_sample_mse
from restune_sd.prior import (MAX_CLASS_IMAGES, check_class_data, check_prior_settings, fill_class_images,
                              prior_preserving)
from restune_sd.prompts import check_draws
from restune_sd.sweep import expand_sweep, sweepable
from restune_sd.text_encoder_lora import check_text_encoder_settings, require_text_encoder_gradient, text_encoder_groups
from restune_sd.trained_with import apply_settings, require_clip_skip, require_zero_snr_schedulers, sampling_record
from restune_sd.validation import held_out_data, read_validation_prompts, validator



@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """Everything a training run depends on; written to RUN_DIR/config.json."""

    model: str = field(metadata={"help": "diffusers SD pipeline folder, hub id, or SD v1.x single-file .safetensors/.ckpt"})
    model_config: str | None = field(default=None, metadata={"help": "a single-file model's diffusers pipeline folder (configs, tokenizer, scheduler)"})
    data: str = field(metadata={"help": "PREFIX:ROOT data spec (coco:, cub:, flowers102:, cars:, aircraft:, food101:, classfolder:, folder:, kohya:, hf:)"})
    tuner: str = field(metadata={"help": "preset name or YAML/JSON tuner config"})
    sweep: list = field(default_factory=list, metadata={"help": "bypass variants trained on one frozen forward: "
                                                        "NAME=V1,V2,... (several: a grid) or a YAML/JSON list of "
                                                        "settings; recorded as the list of variants"})
    split: str = "train"
    resolution: int | None = None
    center_crop: bool = True
    random_flip: bool = False
    caption_template: str = "a photo of a {}"
    caption_extension: str | None = field(default=None, metadata={"help": "kohya: caption files' extension (default: "
                                                                          ".caption, else .txt)"})
    image_column: str = field(default="image", metadata={"help": "hf: the column holding the images"})
    caption_column: str = field(default="text", metadata={"help": "hf: the column holding the captions"})
    caption_dropout: float = field(default=0.0, metadata={"help": "probability a sample's caption is replaced by \"\""})
    shuffle_tags: bool = field(default=False, metadata={"help": "shuffle each caption's comma-separated tags at every draw"})
    keep_tokens: int = field(default=0, metadata={"help": "tags at a caption's start that stay in place, never dropped"})
    tag_dropout: float = field(default=0.0, metadata={"help": "probability each tag after the kept ones is dropped"})
    clip_skip: int = field(default=0, metadata={"help": "text encoder layers skipped from the end (diffusers' clip_skip: "
                                                        "1 is the penultimate layer, A1111's and kohya's clip skip 2)"})
    text_encoder_lora: int | None = field(default=None, metadata={"help": "also train a LoRA of this rank on the text "
                                                                          "encoder's attention and MLP layers"})
    text_encoder_lora_alpha: float | None = field(default=None, metadata={"help": "its alpha (default: its rank)"})
    text_encoder_lr: float | None = field(default=None, metadata={"help": "its learning rate (default: learning_rate)"})
    buckets: bool = field(default=False, metadata={"help": "aspect-ratio buckets of about resolution^2 pixels"})
    bucket_step: int = field(default=64, metadata={"help": "bucket sides are multiples of this many pixels"})
    bucket_min_side: int | None = field(default=None, metadata={"help": "shortest bucket side (default resolution/2)"})
    bucket_max_side: int | None = field(default=None, metadata={"help": "longest bucket side (default resolution*2)"})
    class_data: str | None = field(default=None, metadata={"help": "prior preservation (DreamBooth): folder of class "
                                                                     "images, the missing ones generated into it"})
    class_prompt: str | None = field(default=None, metadata={"help": "the class images' caption, and the prompt that "
                                                                       "generates the missing ones"})
    num_class_images: int = field(default=100, metadata={"help": "class images used; generated with the frozen model "
                                                                 "while the folder holds fewer"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the class images' loss beside the "
                                                                    "instance images'"})
    prediction_type: str | None = None
    snr_gamma: float | None = None
    masked_loss: bool = field(default=False, metadata={"help": "weight the loss by each image's mask: <stem>.mask.png "
                                                                "beside it, or <stem>.png in mask_dir (white trains)"})
    mask_dir: str | None = field(default=None, metadata={"help": "folder of <image stem>.png masks for masked_loss"})
    noise_offset: float = 0.0
    zero_terminal_snr: bool = field(default=False, metadata={"help": "rescale the noise schedule to zero terminal SNR "
                                                                     "(needs v_prediction)"})
    gradient_checkpointing: bool = False
    attention: str = "auto"
    cache: bool = field(default=False, metadata={"help": "keep text embeddings and latents in RUN_DIR/cache/ once computed"})
    encode_ahead: str = field(default="auto", metadata={"help": "encode every latent once before training: yes, no, or "
                                                                   "auto (yes when the run draws every sample at least once)"})
    cache_dir: str = field(default="auto", metadata={"help": "where kept latents (--cache, encode-ahead) are shared by "
                                                             "runs: a folder, auto (the user's cache folder) or none "
                                                             "(RUN_DIR/cache/latents, this run's alone)"})
    validation_prompts: list[str] = field(default_factory=list, metadata={"help": "prompts of the validation images"})
    validation_prompts_file: str | None = field(default=None, metadata={"help": "more validation prompts, one a line "
                                                                              "with kohya's options (--n --w --h --l --s --d --ss)"})
    validation_images: int = field(default=1, metadata={"help": "images per prompt, seeded seed, seed+1, ..."})
    validation_every: int = field(default=0, metadata={"help": "validate every N steps (and at the end) (0: at the end)"})
    validation_steps: int = field(default=25, metadata={"help": "denoising steps of each validation image"})
    validation_data: str | None = field(default=None, metadata={"help": "PREFIX:ROOT held-out data for a validation loss"})
    validation_split: str | None = field(default=None, metadata={"help": "its split (default: val where it has one)"})
    validation_samples: int = field(default=16, metadata={"help": "held-out images the validation loss averages"})
    validation_negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt of validation images"})
    validation_guidance_scale: float = field(default=7.5, metadata={"help": "their classifier-free guidance scale"})
    validation_width: int | None = field(default=None, metadata={"help": "their width (default: --resolution)"})
    validation_height: int | None = field(default=None, metadata={"help": "their height (default: --resolution)"})
    validation_scheduler: str = field(default="ddim", metadata={"help": "their scheduler, as `sample --scheduler`"})
    validation_karras_sigmas: bool = field(default=False, metadata={"help": "their scheduler with Karras sigmas"})
    validation_ema: bool = field(default=False, metadata={"help": "validate with the EMA weights (needs ema)"})

    SAFE_ON_RESUME: ClassVar[tuple[str, ...]] = RunConfig.SAFE_ON_RESUME + (
        "validation_prompts", "validation_prompts_file", "validation_images", "validation_every", "validation_steps",
        "validation_data", "validation_split", "validation_samples", "attention", "gradient_checkpointing",
        "validation_negative_prompt", "validation_guidance_scale", "validation_width", "validation_height",
        "validation_scheduler", "validation_karras_sigmas", "validation_ema", "cache_dir")
    BOUNDS: ClassVar[dict] = {
        **RunConfig.BOUNDS, "resolution": {**WHOLE, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
        "snr_gamma": {"above": 0, "optional": True}, "noise_offset": {"minimum": 0, "maximum": 1},
        "caption_dropout": {"minimum": 0, "maximum": 1}, "bucket_step": {**WHOLE, "minimum": 8},
        "keep_tokens": {**WHOLE, "minimum": 0, "maximum": 1000}, "tag_dropout": {"minimum": 0, "maximum": 1},
        "clip_skip": {**WHOLE, "minimum": 0, "maximum": 1000},  # below the text encoder's depth: checked when it loads
        "text_encoder_lora": {**WHOLE, "minimum": 1, "maximum": 1024, "optional": True},
        "text_encoder_lora_alpha": {"above": 0, "maximum": 1e6, "optional": True},
        "text_encoder_lr": {**RunConfig.BOUNDS["learning_rate"], "optional": True},
        "bucket_min_side": {**WHOLE, "minimum": 8, "optional": True},
        "bucket_max_side": {**WHOLE, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
        "num_class_images": {**WHOLE, "minimum": 1, "maximum": MAX_CLASS_IMAGES},
        "prior_loss_weight": {"minimum": 0, "maximum": 1e4},
        "validation_every": {**WHOLE, "minimum": 0}, "validation_steps": {**WHOLE, "minimum": 1},
        "validation_images": {**WHOLE, "minimum": 1}, "validation_samples": {**WHOLE, "minimum": 1},
        "validation_guidance_scale": {"minimum": 0, "maximum": MAX_GUIDANCE},
        "validation_width": {**WHOLE, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
        "validation_height": {**WHOLE, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
    }

    def __post_init__(self):
        super().__post_init__()
        if self.validation_ema and not self.ema:
            raise UserError("--validation-ema validates with the EMA weights: add --ema")
        prompts = self.validation_prompts
        self.validation_prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])  # one prompt is a list of one
        if self.validation_every and not (self.validation_prompts or self.validation_prompts_file or self.validation_data):
            raise UserError("--validation-every needs something to validate: --validation-prompt, --validation-prompts-file "
                            "or --validation-data")
        from restune_sd.schedulers import scheduler_spec

        scheduler_spec(self.validation_scheduler, self.validation_karras_sigmas, option="--validation-scheduler")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise UserError(f"unknown --prediction-type {self.prediction_type!r}: use epsilon or v_prediction")
        if self.cache and not self.center_crop:
            raise UserError("--cache stores one latent per image and flip: it needs centre crops, not --no-center-crop")
        require_cache_dir(self.cache_dir)
        if self.encode_ahead not in ("auto", "yes", "no"):
            raise UserError(f"unknown --encode-ahead {self.encode_ahead!r}: use auto, yes or no")
        if self.encode_ahead == "yes" and not self.center_crop:
            raise UserError("--encode-ahead yes stores one latent per image and flip: it needs centre crops, not "
                            "--no-center-crop")
        if self.caption_extension is not None and (not self.caption_extension.startswith(".") or
                                                   len(self.caption_extension) < 2):
            raise UserError(f"--caption-extension {self.caption_extension!r} must start with a dot, e.g. .txt or .caption")
        if self.bucket_min_side and self.bucket_max_side and self.bucket_min_side > self.bucket_max_side:
            raise UserError(f"--bucket-min-side {self.bucket_min_side} is above --bucket-max-side {self.bucket_max_side}")
        check_prior_settings(self)
        check_text_encoder_settings(self)
        self.sweep = expand_sweep(self, "unet")
        if self.mask_dir is not None and not self.masked_loss:
            raise UserError(f"--mask-dir {self.mask_dir} holds masks for --masked-loss: add --masked-loss, or leave "
                            "--mask-dir out")
        if self.keep_tokens and not self.tags.active:
            raise UserError(f"--keep-tokens {self.keep_tokens} keeps tags in place against --shuffle-tags or --tag-dropout, "
                            "and neither is given: add one of them or leave --keep-tokens out")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise UserError("--zero-terminal-snr needs --prediction-type v_prediction: at the last timestep the noisy "
                            "latent is pure noise, so predicting the noise (epsilon) teaches nothing and sampling divides by 0")

    @property
    def tags(self):
        """What --shuffle-tags, --keep-tokens and --tag-dropout do to each caption (kohya's caption processing)."""
        from restune_sd.datasets.tags import TagOptions

        return TagOptions(shuffle=self.shuffle_tags, keep=self.keep_tokens, dropout=self.tag_dropout)


@dataclass
class Components:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object


def load_components(model: str, device, dtype, config: str | None = None) -> Components:
    """The pipeline's parts from a folder or hub id, or from a single-file checkpoint with the configs of `config`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from restune_sd.models import check_pipeline, is_single_file, single_file_pipeline

    check_pipeline(model, config)
    if is_single_file(model):  # read in float32 (the UNet trains in it), then the frozen encoders cast to dtype
        pipe = single_file_pipeline(model, config)
        return Components(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder.to(device, dtype),
                          vae=pipe.vae.to(device, dtype), unet=pipe.unet.to(device),
                          noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype).to(device),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype).to(device),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device),
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
        )
    except OSError as error:
        where = "" if Path(model).exists() else "no local folder of that name exists, and as a hub id: "
        raise UserError(f"cannot load a Stable Diffusion pipeline from {model!r}: {where}{str(error).splitlines()[0]}") from None


def prediction_target(scheduler) -> str:
    """What the loss trains the UNet to predict, recorded in the tuner for `sample`: v where the scheduler says so, else
    the noise (epsilon)."""
    return "v_prediction" if scheduler.config.prediction_type == "v_prediction" else "epsilon"


def diffusion_loss(unet, encoders: Encoders, batch: dict, cfg: TrainConfig, step: int, device) -> torch.Tensor:
    """The denoising loss of one micro-batch; noise, timestep and latent sample drawn per sample from (seed, step, position)."""
    return denoising_losses(unet, encoders, batch, cfg, step, device).mean()


def denoising_losses(unet, encoders: Encoders, batch: dict, cfg: TrainConfig, step: int, device) -> torch.Tensor:
    """Each sample's denoising loss. A batch may list each sample's "draws" (integers that seed its draws after the
    seed and the step; default its position) and "latent_keys" (default latent_key): prior preservation's class images."""
    scheduler = encoders.comps.noise_scheduler
    mean, std = encoders.latent_moments(batch["pixel_values"], batch.get("latent_keys") or latent_key(batch), device)
    gens = [seeded(cfg.seed, step, *draw) for draw in batch.get("draws") or [(int(p),) for p in batch["position"]]]
    shape = mean.shape[1:]
    draw = lambda g: torch.randn(shape, generator=g)  # noqa: E731
    latents = (mean + std * torch.stack([draw(g) for g in gens]).to(device, mean.dtype)).float()
    latents = latents * encoders.comps.vae.config.scaling_factor
    noise = torch.stack([draw(g) for g in gens]).to(device)
    if cfg.noise_offset:
        offsets = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in gens]).to(device)
        noise = noise + cfg.noise_offset * offsets
    timesteps = torch.stack([torch.randint(0, scheduler.config.num_train_timesteps, (), generator=g) for g in gens]).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = encoders.text(batch["caption"], device)
    prediction = unet(noisy, timesteps, context).sample.float()  # autocast casts for frozen fp16/bf16 weights
    v_prediction = prediction_target(scheduler) == "v_prediction"
    if v_prediction:
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = per_sample_mse(prediction, target.float(), batch.get("mask") if cfg.masked_loss else None)
    if cfg.snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        per_sample = per_sample * torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if v_prediction else snr)
    return per_sample


def diffusion_job(session: Session) -> Job:
    """The pipeline's UNet with its tuner, the captioned data and the denoising loss; checked before the models load."""
    from restune_sd.attention import set_attention_backend
    from restune_sd.datasets import build_dataset
    from restune_sd.datasets.buckets import bucket_sizes
    from restune_sd.inject import attach
    from restune_sd.models import (check_pipeline, native_resolution, pipeline_resolution, quiet_loading,
                                   text_encoder_layers, vae_factor)

    cfg = session.cfg

    def data(resolution):
        sizes = bucket_sizes(resolution, cfg.bucket_step, cfg.bucket_min_side, cfg.bucket_max_side) if cfg.buckets else None
        return build_dataset(cfg.data, split=cfg.split, resolution=resolution, center_crop=cfg.center_crop,
                             random_flip=cfg.random_flip, caption_template=cfg.caption_template, seed=cfg.seed,
                             caption_extension=cfg.caption_extension, image_column=cfg.image_column,
                             caption_column=cfg.caption_column, caption_dropout=cfg.caption_dropout, bucket_sizes=sizes,
                             tags=cfg.tags, masked_loss=cfg.masked_loss, mask_dir=cfg.mask_dir)

    # The data and the model folder are checked before any model is loaded: a bad root fails in a second, not after minutes.
    require_text_encoder_gradient(cfg, session.tuning)
    check_pipeline(cfg.model)
    require_clip_skip(cfg.clip_skip, text_encoder_layers(cfg.model))
    factor = vae_factor(cfg.model)
    if cfg.resolution is not None and factor:
        require_resolution("--resolution", cfg.resolution, factor)
    if cfg.buckets and factor:
        require_resolution("--bucket-step", cfg.bucket_step, factor)
    resolution = cfg.resolution or pipeline_resolution(cfg.model)
    dataset = data(resolution) if resolution else None
    prompts = read_validation_prompts(cfg)
    check_draws(prompts, {"--validation-width": cfg.validation_width, "--validation-height": cfg.validation_height},
                factor or 8, cfg.validation_karras_sigmas)  # SD v1.x's factor where the folder does not say it
    if cfg.zero_terminal_snr:  # the validation images draw as `sample` will: with a scheduler that rescales its betas
        require_zero_snr_schedulers({cfg.validation_scheduler, *(p.scheduler for p in prompts if p.scheduler)},
                                    "--zero-terminal-snr is set")
    held_out = held_out_data(cfg, resolution) if resolution else None
    check_class_data(cfg)
    quiet_loading()
    comps = load_components(cfg.model, session.device, session.dtype, cfg.model_config)
    cfg = session.cfg = dataclasses.replace(cfg, resolution=resolution or native_resolution(comps.unet.config, comps.vae.config))
    require_resolution("--resolution", cfg.resolution, 2 ** (len(comps.vae.config.block_out_channels) - 1))
    if cfg.buckets:
        require_resolution("--bucket-step", cfg.bucket_step, 2 ** (len(comps.vae.config.block_out_channels) - 1))
    dataset = dataset or data(cfg.resolution)
    held_out = held_out or held_out_data(cfg, cfg.resolution)
    generated = fill_class_images(comps, session)  # with the frozen model as loaded: before its settings and tuner
    apply_settings(comps, cfg, dataset, session)

    torch.manual_seed(cfg.seed)  # the tuners' random initialisation
    unet = attach(comps.unet, session.tuning)
    text_encoder_lora = text_encoder_groups(unet, comps.text_encoder, cfg)
    backend = set_attention_backend(unet, cfg.attention)
    if cfg.gradient_checkpointing and not session.tuning.bypass:
        unet.enable_gradient_checkpointing()
        unet.train()
    cfg = session.cfg = dataclasses.replace(cfg, encode_ahead="yes" if encodes_ahead(cfg, dataset, session) else "no")
    cache = session.run / "cache"
    # Captions whose tags change at every draw would leave one cached embedding per draw, each read at most once or so.
    latents = (latent_store(cfg.cache_dir, cache / "latents", comps.vae, session.dtype)
               if cfg.cache or cfg.encode_ahead == "yes" else None)
    encoders = Encoders(comps, session.dtype, latents=latents,
                        texts=cache / "texts" if cfg.cache and not cfg.tags.active else None, clip_skip=cfg.clip_skip,
                        text_trains=bool(text_encoder_lora))

    def encode_dataset() -> None:
        if cfg.encode_ahead == "yes":
            flips = (False, True) if cfg.random_flip else (False,)
            accelerator = session.accelerator
            encoders.encode_ahead(dataset, flips, accelerator.process_index, accelerator.num_processes, session.device,
                                  show=accelerator.is_main_process)
            accelerator.wait_for_everyone()

    job = Job(unet, dataset, lambda model, batch, step: diffusion_loss(model, encoders, batch, cfg, step, session.device),
               record={"attention_backend": backend, "latent_cache": str(latents.folder) if latents else None},
               prepare=encode_dataset, totals=lambda: encoders.counts,
               on_step=validator(session, comps, unet, prompts, held_out),
               tuner_extra={"prediction_type": prediction_target(comps.noise_scheduler), **sampling_record(cfg)},
               param_groups=text_encoder_lora, finish=training_record(dataset),
               sample_losses=lambda model, batch, step: denoising_losses(model, encoders, batch, cfg, step, session.device))
    return prior_preserving(job, session, encoders, generated)


def encodes_ahead(cfg: TrainConfig, dataset, session: Session) -> bool:
    """--encode-ahead auto: yes with centre crops when the run draws at least as many samples as there are latents to
    encode (so it costs no more VAE work than encoding at each step); decided once and recorded, so a resume keeps it."""
    if cfg.encode_ahead != "auto":
        return cfg.encode_ahead == "yes"
    if not cfg.center_crop:
        return False
    if cfg.max_steps is None:
        return True
    drawn = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation * session.accelerator.num_processes
    return drawn >= len(dataset) * (2 if cfg.random_flip else 1)


def train(cfg: TrainConfig, given: set[str] | None = None) -> dict:
    """Run (or resume) a diffusion training job; returns the results also written to RUN_DIR/results.json.

    On resume every setting comes from the checkpoint; `given` names the ones the user set (default: those not at
    their default value), and only SAFE_ON_RESUME ones may differ.
    """
    return fit(cfg, "unet", sweepable(diffusion_job, "unet"), given, early_files=("cache", "validation"))
