"""Sweeps (`train --sweep learning_rate=1e-4,3e-4`): K Res-Tuning-Bypass variants trained on one frozen forward a step.

Every bypass ladder reads the same frozen taps, so one set of hooks runs the backbone once under no grad, runs the K
ladders on its taps and hands their outputs, stacked along the batch, to the cheap tail after the target (SD:
conv_norm_out, act, conv_out). The loss splits into K per-variant losses whose sum gives each ladder exactly its own
gradient (their weights are disjoint); each variant has its own optimizer param group (learning rate, weight decay,
epsilon), schedule and clipping norm, so it trains as it would alone. Settings that change what the backbone sees
(data, seed, resolution, ...) cannot vary.
"""

import contextlib
import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from restune_sd.config import TuningConfig, read_mapping, resolve_tuner
from restune_sd.errors import UserError
from restune_sd.files import write_text_atomic

# What a variant may change: its ladder and how it is optimised, never the backbone's input or the run's steps.
SWEEPABLE = ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "lr_scheduler", "warmup_steps",
             "lr_num_cycles", "lr_power", "tuner")
# Settings a sweep refuses beside it: they run the tuned backbone on its own (validation) or change the loss.
ALONE_ONLY = {"class_data": "--class-data", "validation_prompts": "--validation-prompt",
              "validation_prompts_file": "--validation-prompts-file", "validation_data": "--validation-data"}
MAX_VARIANTS = 64
NAME = "name"  # a variant's optional name in a sweep file; otherwise made from its settings
LADDER = "restune_bypass.ladder"


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
    given = list(cfg.sweep or [])
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
    settings = {key: typed(key, value, hints[key]) for key, value in settings.items()}
    name = str(variant.get(NAME) or "_".join(f"{key}={short(key, value)}" for key, value in settings.items()))
    name = re.sub(r"[^\w.=+-]", "-", name)[:120].strip(".") or "variant"
    if not settings:
        raise UserError(f"--sweep variant {name} changes no setting: give each variant at least one, e.g. learning_rate")
    try:
        alone = dataclasses.replace(cfg, sweep=[], **settings)
    except UserError as error:
        raise UserError(f"--sweep variant {name}: {error}") from None
    require_bypass(resolve_tuner(alone.tuner, backbone), alone.tuner)
    return {NAME: name, **settings}


def refuse_setting(key: str, hints: dict) -> None:
    if key not in hints:
        raise UserError(f"--sweep: {key} is not a setting of this command; a sweep can vary {', '.join(SWEEPABLE)}")
    if key == "seed":
        raise UserError("--sweep cannot vary seed: it draws every step's noise, timesteps and data order, which the "
                        "variants' one frozen forward shares; run one sweep per seed")
    if key not in SWEEPABLE:
        raise UserError(f"--sweep cannot vary {key}: the variants share the run's data, steps and frozen forward, so "
                        f"only these may vary: {', '.join(SWEEPABLE)}")


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


def require_bypass(tuning: TuningConfig, name: str) -> None:
    if not tuning.bypass:
        raise UserError(f"--sweep trains bypass tuners only (their ladders share one frozen forward); tuner {name!r} "
                        "changes the backbone's own pass: use --tuner bypass (or a bypass config), or train it alone")


def variants_of(cfg, backbone: str) -> list[Variant]:
    """The run's variants (cfg.sweep, expanded) with their settings and tuner configs."""
    variants = []
    for variant in cfg.sweep:
        settings = {k: v for k, v in variant.items() if k != NAME}
        alone = dataclasses.replace(cfg, sweep=[], **settings)
        variants.append(Variant(variant[NAME], settings, alone, resolve_tuner(alone.tuner, backbone)))
    return variants


class LadderSet(nn.Module):
    """K ladders on the same taps: their outputs stacked along the batch, variant k's rows the k-th block."""

    def __init__(self, ladders: list[nn.Module]):
        super().__init__()
        self.ladders = nn.ModuleList(ladders)

    def forward(self, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([ladder(root, stems) for ladder in self.ladders])


class VariantRows(nn.Module):
    """What a sweep's loss calls: the backbone, its output's K*B rows regrouped as [K, B, ...] (variant first)."""

    def __init__(self, backbone: nn.Module, count: int, output: str):
        super().__init__()
        self.backbone, self.count, self.output = backbone, count, output

    def forward(self, *args, **kwargs):
        out = self.backbone(*args, **kwargs)
        return type(out)(**{self.output: getattr(out, self.output).unflatten(0, (self.count, -1))})


class Sweep:
    """A sweep's variants beside the training loop (loop.Job.sweep): their optimizer groups, schedules, clipping, tuner
    folders, per-variant losses and results table."""

    def __init__(self, variants: list[Variant], model: nn.Module, ladders: LadderSet, session):
        self.variants, self.model, self.ladders, self.session = variants, model, ladders, session
        self.lambdas = []
        self._seen, self._step = [], None  # the per-variant losses of the step in progress, per micro-batch

    def param_groups(self, inside: list) -> list[dict]:
        from restune_sd.optimizers import optimizer_arguments

        groups = [{"params": list(ladder.parameters()), **optimizer_arguments(variant.cfg)}
                  for variant, ladder in zip(self.variants, self.ladders.ladders)]
        if {id(p) for group in groups for p in group["params"]} != {id(p) for p in inside}:
            raise RuntimeError("a sweep trains its ladders' weights alone")
        return groups

    def schedule(self, optimizer, total_steps: int, steps_per_epoch: int):
        """Each variant's own schedule on its group: diffusers' schedule of its settings, as it would run alone."""
        from torch.optim.lr_scheduler import LambdaLR

        from restune_sd.runconfig import lr_schedule

        def factor(cfg):
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            return lr_schedule(probe, cfg, total_steps, cfg.warmup(steps_per_epoch)).lr_lambdas[0]

        self.lambdas = [factor(variant.cfg) for variant in self.variants]
        return LambdaLR(optimizer, self.lambdas)

    def clip(self, accelerator) -> None:
        """Each variant's gradients clipped by its own --max-grad-norm (0: not clipped)."""
        accelerator.unscale_gradients()
        for variant, ladder in zip(self.variants, self.ladders.ladders):
            if variant.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(ladder.parameters()), variant.cfg.max_grad_norm)

    @contextlib.contextmanager
    def as_variant(self, k: int):
        """The model as if it carried variant k's tuner alone (its ladder, names and config), for saving it."""
        bypass, tuned = self.model.restune_bypass, self.model.restune
        bypass.ladder = self.ladders.ladders[k]
        names = [name for name, _ in self.model.named_parameters() if name.startswith(LADDER + ".")]
        self.model.restune = dataclasses.replace(tuned, config=self.variants[k].tuning, param_names=names)
        try:
            yield self.model
        finally:
            bypass.ladder, self.model.restune = self.ladders, tuned

    def write_tuners(self, folder: Path, extra: dict, hint: str, ema=None) -> None:
        """Each variant's tuner in FOLDER/<variant>/, the folder `sample --tuner` loads, as trained alone."""
        from restune_sd.runfolder import write_tuner

        for k, variant in enumerate(self.variants):
            with self.as_variant(k) as model:
                write_tuner(model, Path(folder) / variant.name, extra, hint, ema)

    def loss(self, sample_losses):
        """The job's loss: the sum of the variants' mean losses, each variant's kept for its metrics."""

        def loss(model, batch: dict, step: int) -> torch.Tensor:
            per_variant = sample_losses(model, batch, step).mean(dim=-1)
            if torch.is_grad_enabled():  # a training micro-batch, not the weights check's extra forward
                if self._step != step:
                    self._seen, self._step = [], step
                self._seen.append(self.session.accelerator.reduce(per_variant.detach(), reduction="mean"))
            return per_variant.sum()

        return loss

    def metrics(self, step: int) -> dict:
        """Step `step`'s (1-based) loss and learning rate of each variant, as a run of it alone logs them."""
        if not self._seen or self._step != step - 1:
            return {}
        losses = torch.stack(self._seen).float().mean(dim=0).tolist()
        rates = [variant.cfg.learning_rate * factor(step - 1) for variant, factor in zip(self.variants, self.lambdas)]
        return {**{f"loss/{v.name}": loss for v, loss in zip(self.variants, losses)},
                **{f"lr/{v.name}": rate for v, rate in zip(self.variants, rates)}}

    def results(self) -> dict:
        """Each variant's final and mean loss (the last 10 steps) and tuner folder; also written as RUN_DIR/sweep.md."""
        from restune_sd.runfolder import read_metrics

        run = self.session.run
        history = read_metrics(run / "metrics.jsonl")
        table = {}
        for variant in self.variants:
            losses = [h[f"loss/{variant.name}"] for h in history if f"loss/{variant.name}" in h]
            table[variant.name] = {"settings": variant.settings, "final_loss": losses[-1] if losses else None,
                                   "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                                   "tuner_dir": str(run / "tuner" / variant.name),
                                   **({"ema_tuner_dir": str(run / "tuner" / f"{variant.name}-ema")}
                                      if self.session.ema else {})}
        write_text_atomic(run / "sweep.md", sweep_table(table))
        return {"variants": table}


def sweep_table(table: dict) -> str:
    """The variants' results as a Markdown table, the lowest mean loss marked."""
    means = {name: row["mean_loss_last_10"] for name, row in table.items() if row["mean_loss_last_10"] is not None}
    best = min(means, key=means.get) if means else None
    lines = [f"# Sweep: {len(table)} variants on one frozen forward per step", "",
             "| variant | settings | final loss | mean loss (last 10) | tuner |", "|---|---|---|---|---|"]
    for name, row in table.items():
        settings = ", ".join(f"{key}={value}" for key, value in row["settings"].items())
        number = lambda x: "-" if x is None else f"{x:.6g}"  # noqa: E731
        mark = " (lowest)" if name == best else ""
        lines.append(f"| {name}{mark} | {settings} | {number(row['final_loss'])} | "
                     f"{number(row['mean_loss_last_10'])} | tuner/{name} |")
    return "\n".join(lines) + "\n"


def sweepable(build, backbone: str):
    """A job builder that, when the (resumed) settings list a sweep, trains its variants on one frozen forward."""

    def building(session):
        if not session.cfg.sweep:
            return build(session)
        variants = variants_of(session.cfg, backbone)
        session.tuning = variants[0].tuning  # the backbone is built with the first variant's bypass, then all K ladders
        return swept(build(session), session, variants)

    return building


def attach_ladders(model: nn.Module, tunings: list[TuningConfig], seed: int) -> LadderSet:
    """K ladders in place of the one on `model`'s bypass hooks (attached with the first tuning), each initialised as
    when trained alone: from `seed`, the run's."""
    from restune_sd.inject import unet_ladder, vit_ladder

    make = vit_ladder if model.restune.backbone == "vit" else unet_ladder
    ladders = []
    for tuning in tunings:
        torch.manual_seed(seed)
        ladders.append(make(model, tuning.bypass))
    ladders = LadderSet(ladders).to(next(model.parameters()).device)
    model.restune_bypass.ladder = ladders
    model.restune.param_names = [name for name, p in model.named_parameters() if p.requires_grad]
    return ladders


def swept(job, session, variants: list[Variant]):
    """`job` with K ladders on its backbone's one set of bypass hooks, each initialised as when trained alone."""
    if job.sample_losses is None or job.trains is not None:
        raise UserError("--sweep cannot train this job: its loss does not split by variant; leave --sweep out")
    model = job.model
    ladders = attach_ladders(model, [variant.tuning for variant in variants], session.cfg.seed)
    sweep = Sweep(variants, model, ladders, session)
    on_step, finish = job.on_step, job.finish

    def each_step(step: int, last_checkpoint, final: bool) -> dict:
        return {**((on_step(step, last_checkpoint, final) if on_step else None) or {}), **sweep.metrics(step)}

    def finishing(trained) -> dict:
        return {**(finish(trained) if finish else {}), **sweep.results()}

    rows = VariantRows(model, len(variants), "logits" if model.restune.backbone == "vit" else "sample")
    return dataclasses.replace(job, loss=sweep.loss(job.sample_losses), trains=rows, on_step=each_step,
                               finish=finishing, sweep=sweep)
