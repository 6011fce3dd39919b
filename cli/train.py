"""`restune-sd train`: fine-tune a frozen SD UNet with a tuner (thin: parse, build a TrainConfig, call train)."""

import json
from typing import Annotated

import typer

from restune_sd.cli.common import (
    Ema, EmaDecay, EmaPower, EmaWarmup, Optimizer, OptimizerArgs, Sweep,
    CheckpointEvery, GradientAccumulation, KeepCheckpoints, LrNumCycles, LrPower, LrScheduler, LrStepRules, MaxGradNorm,
    MixedPrecision, NumWorkers, ReportTo, Resume, RunOutput, Seed, TensorBoardFlag, config_file, settings_of, user_errors,
)


@user_errors
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="diffusers Stable Diffusion pipeline folder, hub id, or SD v1.x single-file .safetensors/.ckpt")],
    data: Annotated[str, typer.Option(help="PREFIX:ROOT: coco, cub, flowers102, cars, aircraft, food101, classfolder, folder, kohya, hf")],
    output: RunOutput,
    config: config_file("restune_sd.train:TrainConfig") = None,
    model_config: Annotated[str | None, typer.Option(help="with a single-file --model: a diffusers SD v1.x pipeline folder whose configs, tokenizer and scheduler to use (needed offline)")] = None,
    tuner: Annotated[str, typer.Option(help="res-tuning, bypass, adapter, prefix, prompt, lora (r=50, the paper's), lora-r4, full, or a YAML/JSON config")] = "res-tuning",
    sweep: Sweep = None,
    split: Annotated[str, typer.Option(help="data split: train, or val/test where the layout has it")] = "train",
    resolution: Annotated[int | None, typer.Option(help="image size (default: the model's own, 512 for SD v1.5)")] = None,
    center_crop: Annotated[bool, typer.Option(help="centre crop (--no-center-crop: random crop)")] = True,
    random_flip: Annotated[bool, typer.Option(help="random horizontal flips")] = False,
    caption_template: Annotated[str, typer.Option(help="caption for class-labelled sets; {} is the class name")] = "a photo of a {}",
    caption_extension: Annotated[str | None, typer.Option(help="kohya: extension of the caption file beside each image (default: .caption, else .txt)")] = None,
    image_column: Annotated[str, typer.Option(help="hf: the dataset column holding the images")] = "image",
    caption_column: Annotated[str, typer.Option(help="hf: the dataset column holding the captions")] = "text",
    caption_dropout: Annotated[float, typer.Option(help="probability that a sample's caption is replaced by \"\" (for classifier-free guidance)")] = 0.0,
    shuffle_tags: Annotated[bool, typer.Option(help="captions are comma-separated tags: shuffle them at every draw (kohya's --shuffle_caption)")] = False,
    keep_tokens: Annotated[int, typer.Option(help="tags at the start of a caption kept in place, never shuffled or dropped (kohya's --keep_tokens)")] = 0,
    tag_dropout: Annotated[float, typer.Option(help="probability that each tag after the kept ones is dropped, 0 to 1 (kohya's --caption_tag_dropout_rate)")] = 0.0,
    clip_skip: Annotated[int, typer.Option(help="use the text encoder's hidden state N layers before its last, as diffusers' clip_skip (1: the penultimate layer, A1111's and kohya's clip skip 2); recorded for sample")] = 0,
    text_encoder_lora: Annotated[int | None, typer.Option(help="also train a LoRA of rank RANK on the text encoder's attention and MLP layers (q/k/v/out_proj, fc1, fc2), beside the UNet tuner (not bypass); saved with the tuner (kohya trains one unless --network_train_unet_only; diffusers' --train_text_encoder)", metavar="RANK")] = None,
    text_encoder_lora_alpha: Annotated[float | None, typer.Option(help="the text-encoder LoRA's alpha (default: its rank, a scale of 1)")] = None,
    text_encoder_lr: Annotated[float | None, typer.Option(help="the text-encoder LoRA's learning rate (default: --learning-rate; kohya's --text_encoder_lr)")] = None,
    buckets: Annotated[bool, typer.Option(help="aspect-ratio bucketing: each step's images share one bucket of about resolution^2 pixels")] = False,
    bucket_step: Annotated[int, typer.Option(help="bucket sides are multiples of this (a multiple of the VAE factor)")] = 64,
    bucket_min_side: Annotated[int | None, typer.Option(help="shortest bucket side (default: resolution/2)")] = None,
    bucket_max_side: Annotated[int | None, typer.Option(help="longest bucket side (default: resolution*2)")] = None,
    class_data: Annotated[str | None, typer.Option(help="prior preservation (DreamBooth): a folder of class images; while it holds fewer than --num-class-images, the missing ones are generated into it with the frozen model (diffusers' --class_data_dir, kohya's --reg_data_dir)")] = None,
    class_prompt: Annotated[str | None, typer.Option(help="the class images' prompt: generates the missing ones and captions them all in training (diffusers' --class_prompt)")] = None,
    num_class_images: Annotated[int, typer.Option(help="class images used, the first by name; the missing ones are generated (diffusers' --num_class_images)")] = 100,
    prior_loss_weight: Annotated[float, typer.Option(help="weight of the class images' loss beside the instance images' (diffusers' --prior_loss_weight, kohya's --prior_loss_weight)")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps (overrides --epochs)")] = None,
    epochs: Annotated[int, typer.Option(help="passes over the data")] = 1,
    batch_size: Annotated[int, typer.Option(help="images per process per micro-batch")] = 1,
    gradient_accumulation: GradientAccumulation = 1,
    learning_rate: Annotated[float, typer.Option(help="the optimizer's learning rate (Prodigy: 1.0, which scales its own estimate)")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(help="the optimizer's weight decay")] = 1e-2,
    optimizer: Optimizer = "adamw",
    optimizer_args: OptimizerArgs = None,
    ema: Ema = False,
    ema_decay: EmaDecay = 0.9999,
    ema_warmup: EmaWarmup = False,
    ema_power: EmaPower = 2 / 3,
    lr_scheduler: LrScheduler = "constant",
    lr_num_cycles: LrNumCycles = 1,
    lr_power: LrPower = 1.0,
    lr_step_rules: LrStepRules = None,
    warmup_steps: Annotated[int, typer.Option(help="linear warm-up steps")] = 0,
    max_grad_norm: MaxGradNorm = 1.0,
    seed: Seed = 0,
    mixed_precision: MixedPrecision = "no",
    prediction_type: Annotated[str | None, typer.Option(help="epsilon or v_prediction (default: the model's scheduler)")] = None,
    snr_gamma: Annotated[float | None, typer.Option(help="Min-SNR loss weighting gamma (e.g. 5)")] = None,
    masked_loss: Annotated[bool, typer.Option(help="weight the loss by a greyscale mask per image (white trains, black is ignored): <stem>.mask.png beside the image, or <stem>.png in --mask-dir; cropped and flipped with its image (kohya's --masked_loss)")] = False,
    mask_dir: Annotated[str | None, typer.Option(help="folder of <image stem>.png masks for --masked-loss (kohya's conditioning_data_dir)")] = None,
    noise_offset: Annotated[float, typer.Option(help="noise offset: std of a per-channel shift added to the noise (0 to 1; 0.05-0.1 is usual)")] = 0.0,
    zero_terminal_snr: Annotated[bool, typer.Option(help="rescale the noise schedule's betas to zero terminal SNR (with --prediction-type v_prediction); recorded for sample")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="recompute UNet activations in backward (not for bypass)")] = False,
    attention: Annotated[str, typer.Option(help="auto, xformers or sdpa")] = "auto",
    cache: Annotated[bool, typer.Option(help="keep text embeddings and VAE latents in RUN_DIR/cache/ once computed")] = False,
    encode_ahead: Annotated[str, typer.Option(help="encode every latent once before training (as kohya does): yes, no, or auto (yes with centre crops when the run draws every sample at least once)")] = "auto",
    cache_dir: Annotated[str, typer.Option(help="where the latents that --cache and --encode-ahead keep are shared by every run, keyed by the VAE and the cropped pixels, so a later run on the same images encodes none again: a folder, auto ($XDG_CACHE_HOME/restune-sd/latents, else ~/.cache/restune-sd/latents) or none (RUN_DIR/cache/latents, this run's alone)")] = "auto",
    checkpoint_every: CheckpointEvery = 0,
    keep_checkpoints: KeepCheckpoints = 2,
    resume: Resume = None,
    validation_prompts: Annotated[list[str] | None, typer.Option("--validation-prompt", help="prompt of validation images; repeat for several")] = None,
    validation_prompts_file: Annotated[str | None, typer.Option(help="a text file of validation prompts, one a line, with kohya's per-line options: --n negative --w W --h H --l GUIDANCE --s STEPS --d SEED --ss SCHEDULER")] = None,
    validation_images: Annotated[int, typer.Option(help="images per validation prompt (seeds SEED, SEED+1, ...)")] = 1,
    validation_every: Annotated[int, typer.Option(help="validate every N steps (0: only at the end)")] = 0,
    validation_steps: Annotated[int, typer.Option(help="denoising steps of each validation image")] = 25,
    validation_data: Annotated[str | None, typer.Option(help="PREFIX:ROOT held-out data: a validation loss at fixed noise and timesteps")] = None,
    validation_split: Annotated[str | None, typer.Option(help="split of --validation-data (default: val where it has one, else train)")] = None,
    validation_samples: Annotated[int, typer.Option(help="held-out images the validation loss averages")] = 16,
    validation_negative_prompt: Annotated[str | None, typer.Option(help="negative prompt of validation images")] = None,
    validation_guidance_scale: Annotated[float, typer.Option(help="classifier-free guidance scale of validation images, 0 to 100")] = 7.5,
    validation_width: Annotated[int | None, typer.Option(help="width of validation images, a multiple of 8 (default: --resolution)")] = None,
    validation_height: Annotated[int | None, typer.Option(help="height of validation images, a multiple of 8 (default: --resolution)")] = None,
    validation_scheduler: Annotated[str, typer.Option(help="scheduler of validation images, as sample --scheduler (ddim, euler_a, 'DPM++ 2M Karras', a diffusers class, ...)")] = "ddim",
    validation_karras_sigmas: Annotated[bool, typer.Option(help="validation scheduler with Karras sigmas")] = False,
    validation_ema: Annotated[bool, typer.Option(help="validate with the EMA weights (needs --ema)")] = False,
    report_to: ReportTo = "tensorboard",
    tensorboard: TensorBoardFlag = False,
    num_workers: NumWorkers = 0,
):
    """Fine-tune a frozen SD UNet with a tuner; writes the tuner, config, metrics and loss curve to OUTPUT."""
    # On --resume, options left out are taken from the run; only those the user set count as changes.
    settings, given = settings_of(ctx, locals())
    from restune_sd.train import TrainConfig, train as run_training

    results = run_training(TrainConfig(**settings), given=given)
    if results:
        typer.echo(json.dumps(results, indent=2))
