"""Shared pieces of the Typer commands: options declared once, --config files, and the error guard that turns a
UserError into one line and exit 2."""

import dataclasses
import functools
import importlib
import json
import typing
from typing import Annotated

import typer

from restune_sd.errors import UserError

# Options that `train` and `classify train` share, declared once.
RunOutput = Annotated[str, typer.Option(help="new run directory (or the one to --resume)")]
Resume = Annotated[str | None, typer.Option(help="latest, or a checkpoint file, to continue --output")]
GradientAccumulation = Annotated[int, typer.Option(help="micro-batches per optimizer step")]
MaxGradNorm = Annotated[float, typer.Option(help="gradient clipping norm (0: off)")]
Seed = Annotated[int, typer.Option(help="seed of every random draw")]
MixedPrecision = Annotated[str, typer.Option(help="no, fp16 (CUDA) or bf16")]
CheckpointEvery = Annotated[int, typer.Option(help="write a resumable checkpoint every N steps (0: never)")]
KeepCheckpoints = Annotated[int, typer.Option(help="how many checkpoints to keep")]
NumWorkers = Annotated[int, typer.Option(help="data loader workers")]
ReportTo = Annotated[str, typer.Option(help="where loss, lr and validation go: tensorboard (RUN_DIR/tensorboard), wandb, "
                                            "all (both) or none")]
LrScheduler = Annotated[str, typer.Option(help="diffusers' schedules: constant, constant_with_warmup, linear, cosine, "
                                              "cosine_with_restarts, polynomial or piecewise_constant")]
LrNumCycles = Annotated[int, typer.Option(help="cosine_with_restarts: number of hard restarts")]
LrPower = Annotated[float, typer.Option(help="polynomial: the decay's power")]
LrStepRules = Annotated[str | None, typer.Option(help="piecewise_constant: FACTOR:STEP,...,FACTOR, e.g. 1:1000,0.1:2000,0.01")]
TensorBoardFlag = Annotated[bool, typer.Option(help="deprecated: the same as --report-to tensorboard, now the default")]
Optimizer = Annotated[str, typer.Option(help="adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt; use --learning-rate "
                                             "1.0), adafactor (transformers, fixed --learning-rate), lion (lion-pytorch) "
                                             "or sgd")]
OptimizerArgs = Annotated[list[str] | None, typer.Option(
    help="the optimizer's other arguments as KEY=VALUE, e.g. d_coef=2, betas=0.9,0.99, momentum=0.9; repeat for several")]
Ema = Annotated[bool, typer.Option(help="keep an EMA of the trainable weights, saved as RUN_DIR/tuner-ema beside tuner/")]
EmaDecay = Annotated[float, typer.Option(help="the EMA's decay, 0 to below 1 (diffusers' EMAModel ramps up to it)")]
EmaWarmup = Annotated[bool, typer.Option(help="EMAModel's warm-up: decay 1 - (1 + step) ** -power, up to --ema-decay")]
EmaPower = Annotated[float, typer.Option(help="the power of --ema-warmup's ramp (2/3 for long runs, 3/4 for shorter)")]
Sweep = Annotated[list[str] | None, typer.Option(
    help="train bypass variants together, one frozen forward a step: NAME=V1,V2,... (repeat for a grid) with NAME one "
         "of learning_rate, weight_decay, adam_epsilon, max_grad_norm, lr_scheduler, warmup_steps, lr_num_cycles, "
         "lr_power, tuner (classify: also warmup_epochs, and linear variants: heads alone); or a YAML/JSON file "
         "listing mappings of those settings. Each variant's tuner goes to RUN_DIR/tuner/VARIANT/, their losses (and "
         "classify's top-1) to RUN_DIR/sweep.md")]


def user_errors(command):
    """Run a command so that bad input prints `error: ...` on one line and exits 2, never a traceback."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except OSError as error:  # a file the command was given or made cannot be opened: one line naming it
            if not error.filename:
                raise
            typer.echo(f"error: cannot use {error.filename} ({(error.strerror or type(error).__name__).lower()}): "
                       "check that it exists, is readable and its disk is healthy", err=True)
            raise typer.Exit(2) from None

    return guarded


def refuse_booleans_for_numbers(path, settings: dict, hints: dict) -> None:
    """`batch_size: true` is a mistake, not 1: Click would take a YAML boolean for the number 1 or 0."""
    for key, value in settings.items():
        hint = hints.get(key)
        allowed = typing.get_args(hint) or (hint,)
        if isinstance(value, bool) and bool not in allowed and any(t in allowed for t in (int, float)):
            raise UserError(f"{path}: {key} must be a number, not {str(value).lower()}")


def config_file(config_class: str):
    """An eager `--config FILE` option: the settings in FILE become the command's defaults, so flags override them.

    `config_class` ("module:Class") names the config dataclass; settings it has but the command has no flag for
    (e.g. adam_betas) are kept in `ctx.meta["config_extra"]` for the command to pass on (see `settings_of`).
    """

    def read(ctx: typer.Context, param, value: str | None):
        if value is None:
            return value
        from restune_sd.config import read_run_settings

        module, name = config_class.split(":")
        config_type = getattr(importlib.import_module(module), name)
        fields = {f.name for f in dataclasses.fields(config_type)}
        try:
            settings = read_run_settings(value, fields, option_aliases(ctx.command))
            refuse_booleans_for_numbers(value, settings, typing.get_type_hints(config_type))
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        for option in ctx.command.params:  # `validation-prompt: a cat` is one prompt, as the flag given once is
            if option.multiple and isinstance(settings.get(option.name), str):
                settings[option.name] = [settings[option.name]]
            if option.multiple and isinstance(settings.get(option.name), dict):  # optimizer_args: {d_coef: 2}
                settings[option.name] = [f"{key}={value}" for key, value in settings[option.name].items()]
            if option.multiple and isinstance(settings.get(option.name), list):  # sweep: [{learning_rate: 1e-4}, ...]
                settings[option.name] = [json.dumps(item) if isinstance(item, dict) else item
                                         for item in settings[option.name]]
        flags = {p.name for p in ctx.command.params}
        ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in settings.items() if k in flags}}
        ctx.meta["config_extra"] = {k: v for k, v in settings.items() if k not in flags}
        return value

    return Annotated[str | None, typer.Option("--config", is_eager=True, callback=read, help=(
        "YAML/JSON file of settings (option names with dashes or underscores; a run's config.json repeats that run); "
        "flags given beside it override it"))]


def option_aliases(command) -> dict[str, tuple[str, bool]]:
    """Each option's names as --help prints them, as `read_run_settings` takes them: name -> (setting, negated),
    e.g. validation_prompt -> (validation_prompts, False), no_center_crop -> (center_crop, True)."""
    return {opt.lstrip("-").replace("-", "_"): (option.name, negated) for option in command.params
            for opts, negated in ((option.opts, False), (getattr(option, "secondary_opts", []), True))
            for opt in opts if opt.startswith("--")}


def settings_of(ctx: typer.Context, local_values: dict) -> tuple[dict, set[str]]:
    """A command's settings (its options, plus --config settings it has no flag for) and the names the user set.

    Set means typed on the command line or read from --config: on --resume only those count as changes.
    """
    settings = {**ctx.meta.get("config_extra", {}),
                **{k: v for k, v in local_values.items() if k not in ("ctx", "config")}}
    given = {k for k in settings if k in ctx.meta.get("config_extra", {})
             or getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
    return settings, given
