"""What a sweep's variants are (`--sweep NAME=V1,V2,...` or a YAML/JSON list): parsed, typed and checked against the
command's settings, each refused in one line unless it changes only what a bypass variant may change (SWEEPABLE)."""

import dataclasses
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from restune_sd.config import TuningConfig, read_mapping, resolve_tuner
from restune_sd.errors import UserError

# What a variant may change: its ladder and how it is optimised, never the backbone's input or the run's steps.
SWEEPABLE = ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "lr_scheduler", "warmup_steps",
             "warmup_epochs", "lr_num_cycles", "lr_power", "tuner")  # warmup_epochs: classify train's
# Settings a sweep refuses beside it: they run the tuned backbone on its own (validation) or change the loss.
ALONE_ONLY = {"class_data": "--class-data", "validation_prompts": "--validation-prompt",
              "validation_prompts_file": "--validation-prompts-file", "validation_data": "--validation-data"}
MAX_VARIANTS = 64
NAME = "name"  # a variant's optional name in a sweep file; otherwise made from its settings


@dataclass
class Variant:
    """One variant: its name (its tuner's sub-folder), the settings it changes, the run's settings with them (what it
    would train with alone) and its tuner config."""

    name: str
    settings: dict
    cfg: object
    tuning: TuningConfig


def expand_sweep(cfg, backbone: str) -> list[dict]:
    """`cfg.sweep` as the explicit list of variants ({name, setting: value, ...}), each checked: NAME=V1,V2,... strings
    (several make a grid), one YAML/JSON file holding a list of mappings, or such a list already expanded."""
    # A mapping as JSON text: how a run's config.json reaches the command through --config (Click keeps only strings).
    given = [json.loads(item) if isinstance(item, str) and item.lstrip().startswith("{") else item
             for item in cfg.sweep or []]
    if not given:
        return []
    if all(isinstance(item, dict) for item in given):
        variants = [dict(item) for item in given]
    elif all(isinstance(item, str) for item in given):
        files = [item for item in given if "=" not in item]
        if files and len(given) > 1:
            raise UserError(f"--sweep {files[0]} is a file of variants: give it alone, or NAME=V1,V2,... options alone")
        variants = read_variants(files[0]) if files else grid(given)
    else:
        raise UserError("sweep must be NAME=V1,V2,... strings or a list of mappings of settings")
    for field, flag in ALONE_ONLY.items():
        if getattr(cfg, field, None):
            raise UserError(f"--sweep does not combine with {flag} yet (it would run each variant's tuned backbone on "
                            f"its own): leave {flag} out, then train the variant you pick with it")
    if len(variants) > MAX_VARIANTS:
        raise UserError(f"--sweep gives {len(variants)} variants; at most {MAX_VARIANTS} train on one forward")
    checked = [check_variant(cfg, backbone, variant) for variant in variants]
    names = [variant[NAME] for variant in checked]
    if twice := next((name for name in names if names.count(name) > 1), None):
        raise UserError(f"--sweep gives variant {twice} twice: each variant's settings (or name) must differ")
    if clash := next((name for name in names if f"{name}-ema" in names), None):  # NAME-ema holds NAME's EMA tuner
        raise UserError(f"--sweep variants {clash} and {clash}-ema would share the folder {clash}-ema (the first's EMA "
                        "weights go there): rename one of them")
    return checked


def grid(specs: list[str]) -> list[dict]:
    """Every combination of the NAME=V1,V2,... options' values, named by their values as typed."""
    axes, seen = [], set()
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        texts = [text.strip() for text in values.split(",")]
        if not key or not all(texts):
            raise UserError(f"--sweep {spec!r} lists an empty value: write NAME=V1,V2,..., e.g. learning_rate=1e-4,3e-4")
        if key in seen:
            raise UserError(f"--sweep names {key} twice: give all its values in one option, comma-separated")
        seen.add(key)
        axes.append([(key, text) for text in texts])
    return [{NAME: "_".join(f"{key}={short(key, text)}" for key, text in combo), **dict(combo)}
            for combo in itertools.product(*axes)]


def read_variants(path: str) -> list[dict]:
    """A sweep file: a YAML/JSON list of mappings of settings, each one variant."""
    if Path(path).suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"--sweep {path!r}: write NAME=V1,V2,... (e.g. learning_rate=1e-4,3e-4) or a .yaml/.json file "
                        "holding a list of variants")
    variants = read_mapping(path, "sweep file", "[{learning_rate: 1e-4}, {learning_rate: 3e-4}]", expected=list)
    if not variants or not all(isinstance(item, dict) and item for item in variants):
        raise UserError(f"sweep file {path} must list one or more mappings of settings, e.g. - learning_rate: 1e-4")
    return variants


def short(key: str, value) -> str:
    """A value as a variant's name shows it: a tuner file by its stem."""
    text = str(value)
    return Path(text).stem if key == "tuner" and Path(text).suffix in (".yaml", ".yml", ".json") else text


def check_variant(cfg, backbone: str, variant: dict) -> dict:
    """A variant's settings converted to their types, refused in one line unless only settings in SWEEPABLE change
    and the run's settings with them pass every check a run's settings pass (bounds included)."""
    hints = typing.get_type_hints(type(cfg))
    settings = {str(key).replace("-", "_"): value for key, value in variant.items() if key != NAME}
    for key in settings:
        refuse_setting(key, hints)
    hints = {key: optional_of(hint) for key, hint in hints.items()}
    settings = {key: typed(key, value, hints[key]) for key, value in settings.items()}
    name = str(variant.get(NAME) or "_".join(f"{key}={short(key, value)}" for key, value in settings.items()))
    name = re.sub(r"[^\w.=+-]", "-", name)[:120].strip(".") or "variant"
    if not settings:
        raise UserError(f"--sweep variant {name} changes no setting: give each variant at least one, e.g. learning_rate")
    try:
        alone = dataclasses.replace(cfg, sweep=[], **settings)
    except UserError as error:
        raise UserError(f"--sweep variant {name}: {error}") from None
    require_bypass(resolve_tuner(alone.tuner, backbone), alone.tuner, backbone)
    return {NAME: name, **settings}


def refuse_setting(key: str, hints: dict) -> None:
    allowed = ", ".join(name for name in SWEEPABLE if name in hints)
    if key not in hints:
        raise UserError(f"--sweep: {key} is not a setting of this command; a sweep can vary {allowed}")
    if key == "seed":
        raise UserError("--sweep cannot vary seed: it draws every step's noise, timesteps and data order, which the "
                        "variants' one frozen forward shares; run one sweep per seed")
    if key not in SWEEPABLE:
        raise UserError(f"--sweep cannot vary {key}: the variants share the run's data, steps and frozen forward, so "
                        f"only these may vary: {allowed}")


def optional_of(hint):
    """`float | None` (a setting a recipe fills when left out) as `float`: a variant always gives a value."""
    args = typing.get_args(hint)
    return next(arg for arg in args if arg is not type(None)) if len(args) == 2 and type(None) in args else hint


def typed(key: str, value, hint):
    """A variant's value as its setting's type: text (an option's, or a YAML string such as 1e-4) is converted."""
    if hint in (int, float) and isinstance(value, str):
        try:
            value = hint(value)
        except ValueError:
            kind = "a whole number" if hint is int else "a number"
            raise UserError(f"--sweep {key}={value}: {value!r} is not {kind}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or isinstance(value, bool) != (hint is bool):
        raise UserError(f"--sweep {key}={value!r} must be a {hint.__name__}")
    if hint is float and not math.isfinite(value):
        raise UserError(f"--sweep {key}={value}: must be a finite number")
    return value


def require_bypass(tuning: TuningConfig, name: str, backbone: str) -> None:
    """Only what reads the frozen backbone's features can share its forward: a bypass, and on a ViT a head alone
    (`linear`: its variants are K heads on the same features)."""
    head_alone = backbone == "vit" and not (tuning.bypass or tuning.tuners or tuning.lora or tuning.full)
    if head_alone and not tuning.train_head:
        raise UserError(f"--sweep: tuner {name!r} trains nothing (no bypass, and train_head is false)")
    if not (tuning.bypass or head_alone):
        also = ", or linear (heads alone)" if backbone == "vit" else ""
        raise UserError(f"--sweep trains bypass tuners only (their ladders share one frozen forward){also}; tuner "
                        f"{name!r} changes the backbone's own pass: use --tuner bypass (or a bypass config), or train "
                        "it alone")


def variants_of(cfg, backbone: str) -> list[Variant]:
    """The run's variants (cfg.sweep, expanded) with their settings and tuner configs."""
    variants = []
    for variant in cfg.sweep:
        settings = {k: v for k, v in variant.items() if k != NAME}
        alone = dataclasses.replace(cfg, sweep=[], **settings)
        variants.append(Variant(variant[NAME], settings, alone, resolve_tuner(alone.tuner, backbone)))
    return variants
