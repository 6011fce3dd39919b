"""`restune-sd classify train | eval | predict`: tune ViT classifiers, evaluate them, and predict with many at once."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import (
    Ema, EmaDecay, EmaPower, EmaWarmup, Optimizer, OptimizerArgs,
    CheckpointEvery, GradientAccumulation, KeepCheckpoints, LrNumCycles, LrPower, LrScheduler, LrStepRules, MixedPrecision,
    NumWorkers, ReportTo, Resume, RunOutput, Seed, Sweep, TensorBoardFlag, config_file, settings_of, user_errors,
)

app = typer.Typer(help="Tune ViT image classifiers (VTAB-1K, FGVC, class folders) and predict with many tuners at once.",
                  no_args_is_help=True)

# Options that `train` and `eval --vtab-all` share, declared once.
Model = Annotated[str, typer.Option(help="transformers ViT folder or hub id (e.g. google/vit-base-patch16-224-in21k)")]
Tuner = Annotated[str, typer.Option(help="res-tuning, bypass, adapter, prefix, prompt, lora, linear, full, or a YAML/JSON config")]
Epochs = Annotated[int, typer.Option(help="passes over the training split (VTAB-1K: 100)")]
MaxSteps = Annotated[int | None, typer.Option(help="optimizer steps (overrides --epochs)")]
BatchSize = Annotated[int, typer.Option(help="images per process per step (VTAB-1K: 64)")]
LearningRate = Annotated[float | None, typer.Option(
    help="learning rate (default: the preset's recipe, docs/method.md §4: 5e-3 adapter and lora, 1e-3 others; "
         "with --optimizer prodigy, 1.0)")]
RecipeGradNorm = Annotated[float | None, typer.Option(
    help="gradient clipping norm, 0: off (default: the preset's recipe: off for adapter, lora and prompt, 1.0 others)")]
WeightDecay = Annotated[float, typer.Option(help="the optimizer's weight decay (VTAB-1K: 1e-4)")]
WarmupEpochs = Annotated[int, typer.Option(help="linear warm-up epochs before the cosine decay")]


@app.command("train")
@user_errors
def train(
    ctx: typer.Context,
    model: Model,
    data: Annotated[str, typer.Option(help="PREFIX:ROOT: vtab:ROOT/TASK, cub, nabirds, flowers102, dogs, cars, classfolder")],
    output: RunOutput,
    config: config_file("restune_sd.classify:ClassifyConfig") = None,
    tuner: Tuner = "res-tuning",
    sweep: Sweep = None,
    split: Annotated[str, typer.Option(help="training split (vtab: train = train800val200; FGVC: train = train minus the "
                                            "val carved from it, trainval = all training images)")] = "train",
    eval_split: Annotated[str, typer.Option(help="split scored at the end, with the final weights")] = "test",
    resolution: Annotated[int | None, typer.Option(help="image size (default: the model's own, 224 for ViT-B/16)")] = None,
    random_flip: Annotated[bool | None, typer.Option(
        help="random horizontal flips of training images (default: the data's protocol: on for FGVC, off otherwise)")] = None,
    cache_taps: Annotated[str, typer.Option(
        help="bypass and linear: compute each training image's frozen-ViT taps (class tokens) once and train on them: "
             "yes, no, or auto (yes without random flips or crops, when the run sees every image)")] = "auto",
    max_steps: MaxSteps = None,
    epochs: Epochs = 100,
    batch_size: BatchSize = 64,
    gradient_accumulation: GradientAccumulation = 1,
    learning_rate: LearningRate = None,
    weight_decay: WeightDecay = 1e-4,
    optimizer: Optimizer = "adamw",
    optimizer_args: OptimizerArgs = None,
    ema: Ema = False,
    ema_decay: EmaDecay = 0.9999,
    ema_warmup: EmaWarmup = False,
    ema_power: EmaPower = 2 / 3,
    lr_scheduler: LrScheduler = "cosine",
    lr_num_cycles: LrNumCycles = 1,
    lr_power: LrPower = 1.0,
    lr_step_rules: LrStepRules = None,
    warmup_epochs: WarmupEpochs = 10,
    warmup_steps: Annotated[int, typer.Option(help="warm-up in steps (overrides --warmup-epochs when > 0)")] = 0,
    max_grad_norm: RecipeGradNorm = None,
    seed: Seed = 0,
    mixed_precision: MixedPrecision = "no",
    checkpoint_every: CheckpointEvery = 0,
    keep_checkpoints: KeepCheckpoints = 2,
    resume: Resume = None,
    eval_batch_size: Annotated[int, typer.Option(help="images per batch when scoring")] = 64,
    report_to: ReportTo = "tensorboard",
    tensorboard: TensorBoardFlag = False,
    num_workers: NumWorkers = 0,
):
    """Tune a frozen ViT with a tuner and a new head; writes the tuner, config, metrics, loss curve and top-1 to OUTPUT."""
    settings, given = settings_of(ctx, locals())
    from restune_sd.classify import ClassifyConfig, classify

    results = classify(ClassifyConfig(**settings), given=given)
    if results:
        typer.echo(json.dumps(results, indent=2))


@app.command("eval")
@user_errors
def evaluate(
    model: Model,
    tuner: Annotated[str | None, typer.Option(help="a trained tuner folder or run directory to score")] = None,
    data: Annotated[str | None, typer.Option(help="PREFIX:ROOT to score --tuner on")] = None,
    split: Annotated[str, typer.Option(help="split to score")] = "test",
    vtab_all: Annotated[Path | None, typer.Option(help="train and score every VTAB-1K task folder in this folder")] = None,
    output: Annotated[str | None, typer.Option(help="with --vtab-all: folder of the runs and the table")] = None,
    preset: Annotated[str, typer.Option("--preset", help="with --vtab-all: the tuner to train")] = "res-tuning",
    max_steps: MaxSteps = None,
    epochs: Epochs = 100,
    batch_size: BatchSize = 64,
    learning_rate: LearningRate = None,
    max_grad_norm: RecipeGradNorm = None,
    weight_decay: WeightDecay = 1e-4,
    warmup_epochs: WarmupEpochs = 10,
    seed: Seed = 0,
    mixed_precision: MixedPrecision = "no",
    checkpoint_every: CheckpointEvery = 0,
    keep_checkpoints: KeepCheckpoints = 2,
):
    """Top-1 of a trained tuner on a split of data of the same classes; or, with --vtab-all, train every VTAB-1K task
    and write the paper's table (a task OUTPUT already holds is reused only if trained with these settings)."""
    from restune_sd.classify import ClassifyConfig, score_tuner
    from restune_sd.errors import UserError
    from restune_sd.vtab import vtab_all as train_vtab_all

    if vtab_all is not None:
        if output is None:
            raise UserError("--vtab-all needs --output, the folder for each task's run and the table")
        cfg = ClassifyConfig(model=model, data="vtab:", tuner=preset, output=output, max_steps=max_steps, epochs=epochs,
                             batch_size=batch_size, learning_rate=learning_rate, max_grad_norm=max_grad_norm,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed, mixed_precision=mixed_precision,
                             checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
        typer.echo(json.dumps(train_vtab_all(cfg, vtab_all, output), indent=2))
        return
    if tuner is None or data is None:
        raise UserError("pass --tuner and --data to score a trained tuner, or --vtab-all ROOT --output DIR")
    typer.echo(json.dumps(score_tuner(model, tuner, data, split, batch_size), indent=2))


@app.command("predict")
@user_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files or folders of images")],
    model: Model,
    tuner: Annotated[list[str], typer.Option(help="a trained tuner or run directory; repeat for several tasks")],
    top_k: Annotated[int, typer.Option(help="how many classes to list per image and task")] = 5,
    batch_size: Annotated[int, typer.Option(help="images per backbone forward")] = 32,
):
    """One JSON line per image and task; bypass tuners share one backbone forward per batch."""
    from restune_sd.classify import predictions

    for line in predictions(model, tuner, images, top_k, batch_size, notice=lambda text: typer.echo(text, err=True)):
        typer.echo(json.dumps(line))
        sys.stdout.flush()
