"""The optimizers a run can train with (`--optimizer`, `--optimizer-args KEY=VALUE`): each maintained package's own
class, its keyword arguments checked here, and the one-line reasons one cannot run (a missing package, a device
bitsandbytes does not support) found before the model loads."""

import ast
import contextlib
import dataclasses
import importlib
import logging
import re
import sys
from dataclasses import dataclass, field

import torch

from restune_sd.bounds import require_number
from restune_sd.errors import UserError


@dataclass(frozen=True)
class Arg:
    """One --optimizer-args key: a bool, a number or a pair of numbers, within bounds (None too where `optional`)."""

    kind: str  # "bool", "number" or "pair"
    bounds: dict = field(default_factory=dict)
    optional: bool = False


BOOL = Arg("bool")
BETA = {"minimum": 0, "maximum": 0.9999999}
BETAS = Arg("pair", BETA)
EPSILON = Arg("number", {"minimum": 1e-30, "maximum": 1})


@dataclass(frozen=True)
class Optimizer:
    """Where an optimizer comes from, and the --optimizer-args it takes (lr and weight_decay have their own options)."""

    module: str
    name: str
    package: str  # what `pip install` installs the module
    args: dict[str, Arg]
    adam: bool = False  # betas and eps default to the run's adam_betas and adam_epsilon


OPTIMIZERS = {
    "adamw": Optimizer("torch.optim", "AdamW", "torch", {"betas": BETAS, "eps": EPSILON, "amsgrad": BOOL}, adam=True),
    "adamw8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {
        "betas": BETAS, "eps": EPSILON, "min_8bit_size": Arg("number", {"integer": True, "minimum": 1}),
        "is_paged": BOOL}, adam=True),
    "prodigy": Optimizer("prodigyopt", "Prodigy", "prodigyopt", {
        "betas": BETAS, "eps": EPSILON, "beta3": Arg("number", BETA, optional=True), "decouple": BOOL,
        "use_bias_correction": BOOL, "safeguard_warmup": BOOL, "d0": Arg("number", {"above": 0, "maximum": 1e6}),
        "d_coef": Arg("number", {"above": 0, "maximum": 1e6}), "growth_rate": Arg("number", {"minimum": 1}),
        "slice_p": Arg("number", {"integer": True, "minimum": 1})}, adam=True),
    "adafactor": Optimizer("transformers.optimization", "Adafactor", "transformers", {
        "eps": Arg("pair", {"minimum": 1e-30, "maximum": 1}), "clip_threshold": Arg("number", {"above": 0}),
        "decay_rate": Arg("number", {"minimum": -1, "maximum": 0}), "beta1": Arg("number", BETA, optional=True),
        "scale_parameter": BOOL, "relative_step": BOOL, "warmup_init": BOOL}),
    "lion": Optimizer("lion_pytorch", "Lion", "lion-pytorch", {"betas": BETAS, "decoupled_weight_decay": BOOL}),
    "sgd": Optimizer("torch.optim", "SGD", "torch", {
        "momentum": Arg("number", BETA), "dampening": Arg("number", {"minimum": 0, "maximum": 1}), "nesterov": BOOL}),
}
# transformers' Adafactor defaults scale the step by each weight's RMS and compute their own learning rate; these make
# it take --learning-rate (and the --lr-scheduler) as it is, as kohya's and diffusers' fixed-rate recipes do.
ADAFACTOR_DEFAULTS = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
OWN_OPTIONS = {"lr": "--learning-rate", "weight_decay": "--weight-decay"}
PAIR = re.compile(r"\s+(?=[A-Za-z_]\w*\s*=)")  # "a=1 b=0.9,0.99": a space before the next KEY= splits pairs


def check_optimizer_settings(cfg) -> None:
    """Validate cfg.optimizer and cfg.optimizer_args in place: the arguments become a dict of checked plain values
    (None when there are none), which config.json records."""
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {cfg.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    spec = OPTIMIZERS[cfg.optimizer]
    given = parse_optimizer_args(cfg.optimizer_args)
    for key, value in given.items():
        if key in OWN_OPTIONS:
            raise UserError(f"--optimizer-args {key}: set it with {OWN_OPTIONS[key]}")
        if key not in spec.args:
            raise UserError(f"--optimizer-args {key}: {cfg.optimizer} takes {', '.join(sorted(spec.args))} "
                            f"(lr and weight_decay: --learning-rate and --weight-decay)")
        given[key] = checked_value(f"--optimizer-args {key}", value, spec.args[key])
    if spec.adam:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        for key, own in (("betas", "adam_betas"), ("eps", "adam_epsilon")):
            if key in given and not same(getattr(cfg, own), defaults[own]):
                raise UserError(f"{key} is given twice, as {own} and in --optimizer-args: keep one")
    check_combinations(cfg.optimizer, {**(ADAFACTOR_DEFAULTS if cfg.optimizer == "adafactor" else {}), **given})
    cfg.optimizer_args = given or None


def same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b


def parse_optimizer_args(raw) -> dict:
    """KEY=VALUE strings (several in one string, space-separated, as kohya's --optimizer_args), or a dict as a
    config file or config.json holds them; values are Python literals (1e-3, true, 0.9,0.99), also where a YAML file
    left them strings (PyYAML reads 1e-3 as one)."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k): literal(str(k), v) if isinstance(v, str) else v for k, v in raw.items()}
    texts = [raw] if isinstance(raw, str) else list(raw)
    pairs = {}
    for text in texts:
        for pair in (p for p in PAIR.split(str(text).strip()) if p):
            key, equals, value = pair.partition("=")
            if not equals or not key.strip().isidentifier():
                raise UserError(f"--optimizer-args {pair!r} is not KEY=VALUE (e.g. d_coef=2 or betas=0.9,0.99)")
            pairs[key.strip()] = literal(key.strip(), value.strip())
    return pairs


def literal(key: str, text: str):
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise UserError(f"--optimizer-args {key}={text}: the value must be a number, true/false, none or "
                        "two numbers (0.9,0.99)") from None


def checked_value(name: str, value, arg: Arg):
    """The value as config.json records it (a pair as a list), or a UserError naming what the key takes."""
    if value is None and arg.optional:
        return None
    if arg.kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, not {value!r}")
        return value
    if arg.kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise UserError(f"{name} must be two numbers (e.g. 0.9,0.99), not {value!r}")
        return [require_number(name, v, **arg.bounds) for v in value]
    return require_number(name, value, **arg.bounds)


def check_combinations(name: str, args: dict) -> None:
    """What the optimizers themselves would refuse mid-setup, said in one line before anything runs."""
    if name == "adafactor" and (args["relative_step"] or args["warmup_init"]):
        raise UserError("--optimizer-args relative_step/warmup_init: Adafactor then computes its own learning rate, "
                        "which --learning-rate and --lr-scheduler cannot drive; restune-sd runs it with "
                        "relative_step=false (a fixed --learning-rate such as 1e-4 to 1e-3)")
    if name == "sgd" and args.get("nesterov") and (not args.get("momentum") or args.get("dampening")):
        raise UserError("--optimizer-args nesterov=true needs momentum > 0 and dampening 0 (e.g. momentum=0.9)")


def optimizer_class(name: str):
    """The optimizer's class, imported; a missing package is one line naming what to pip install."""
    spec = OPTIMIZERS[name]
    quiet = logging.getLogger("bitsandbytes")  # it logs about CPU kernels it fails to fetch, at import
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return getattr(importlib.import_module(spec.module), spec.name)
    except ImportError as error:
        extra = " (or pip install 'restune-sd[8bit]')" if name == "adamw8bit" else ""
        raise UserError(f"--optimizer {name} needs the {spec.package} package, which cannot be imported "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__}): "
                        f"pip install {spec.package}{extra}") from None
    finally:
        quiet.setLevel(level)


def optimizer_arguments(cfg) -> dict:
    """The keyword arguments the optimizer class is built with: the run's own settings, then --optimizer-args."""
    spec = OPTIMIZERS[cfg.optimizer]
    chosen = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if spec.adam:
        chosen.update(betas=tuple(cfg.adam_betas), eps=cfg.adam_epsilon)
    if cfg.optimizer == "adafactor":
        chosen.update(ADAFACTOR_DEFAULTS)
    chosen.update({k: tuple(v) if isinstance(v, list) else v for k, v in (cfg.optimizer_args or {}).items()})
    return chosen


def build_optimizer(params: list, cfg):
    """The run's optimizer over the trainable parameters."""
    optimizer = optimizer_class(cfg.optimizer)
    with contextlib.redirect_stdout(sys.stderr):  # Prodigy prints a note: stdout carries the results' JSON
        return optimizer(params, **optimizer_arguments(cfg))


def require_optimizer(cfg, device: torch.device, main: bool) -> None:
    """Before the model loads: the optimizer's package imports and, for 8-bit AdamW, takes a step on `device`
    (bitsandbytes supports some devices only, and older versions no CPU); Prodigy's usual learning rate is said."""
    optimizer_class(cfg.optimizer)
    if cfg.optimizer == "adamw8bit":
        probe_8bit(cfg, device)
    if cfg.optimizer == "prodigy" and cfg.learning_rate < 0.1 and main:
        from restune_sd.files import warn

        warn(f"Prodigy estimates its step size itself and multiplies it by --learning-rate, which is usually 1.0: "
             f"--learning-rate {cfg.learning_rate:g} makes its steps {cfg.learning_rate:g} times those it estimates")


def probe_8bit(cfg, device: torch.device) -> None:
    """One 8-bit AdamW step on a tensor large enough to be kept in 8 bits, on the run's device."""
    import bitsandbytes

    try:
        weight = torch.nn.Parameter(torch.zeros(4096, device=device))
        weight.grad = torch.ones_like(weight)
        optimizer_class("adamw8bit")([weight], **{**optimizer_arguments(cfg), "min_8bit_size": 4096}).step()
        usable = bool(torch.isfinite(weight).all())
    except Exception as error:  # noqa: BLE001 (any failure of the library on this device is the answer)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"--optimizer adamw8bit: bitsandbytes {bitsandbytes.__version__} cannot run 8-bit AdamW on "
                        f"this machine's {device.type} ({reason}); use --optimizer adamw, or a CUDA GPU") from None
    if not usable:
        raise UserError(f"--optimizer adamw8bit: bitsandbytes {bitsandbytes.__version__} gives non-finite 8-bit AdamW "
                        f"steps on this machine's {device.type}; use --optimizer adamw")
