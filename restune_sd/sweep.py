"""Sweeps (`train --sweep learning_rate=1e-4,3e-4`): K Res-Tuning-Bypass variants trained on one frozen forward a step.

Every bypass ladder reads the same frozen taps, so one set of hooks runs the backbone once under no grad, runs the K
ladders on its taps and hands their outputs, stacked along the batch, to the cheap tail after the target (SD:
conv_norm_out, act, conv_out; ViT: the final layer norm and K heads, sweep_vit.py). The loss splits into K per-variant
losses whose sum gives each ladder exactly its own gradient (their weights are disjoint); each variant has its own
optimizer param group (learning rate, weight decay, epsilon), schedule and clipping norm, so it trains as it would alone. Settings that change what the backbone sees
(data, seed, resolution, ...) cannot vary; sweep_spec.py parses and checks the variants.
"""

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from restune_sd.config import TuningConfig
from restune_sd.errors import UserError
from restune_sd.files import write_text_atomic
from restune_sd.sweep_spec import Variant, expand_sweep, variants_of  # noqa: F401 (expand_sweep: the configs')

LADDER = "restune_bypass.ladder"


class LadderSet(nn.Module):
    """K ladders on the same taps: their outputs stacked along the batch, variant k's rows the k-th block.
    `recompute`: keep no ladder's activations for backward (a UNet's, large); a ViT's, on 13 tokens, are not worth
    the second forward, which on cached taps is a third of the work."""

    def __init__(self, ladders: list[nn.Module], recompute: bool = False):
        super().__init__()
        self.ladders, self.recompute = nn.ModuleList(ladders), recompute

    def forward(self, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        if not self.recompute or len(self.ladders) == 1 or not torch.is_grad_enabled():
            return torch.cat([ladder(root, stems) for ladder in self.ladders])
        # Saved for backward, K ladders' activations would all be alive when backward starts. Each ladder is run
        # again in its own backward instead, so one ladder's are alive at a time; the taps are saved once for all,
        # and a ladder's forward is a few percent of the frozen UNet's. The values are those of the plain forward.
        return torch.cat([checkpoint(ladder, root, stems, use_reentrant=False) for ladder in self.ladders])


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
    folders, per-variant losses and results table. `ladders` is None for a ViT's linear variants alone; `heads`
    (restune_sd.sweep_vit.HeadSet) holds a ViT's K classification heads."""

    def __init__(self, variants: list[Variant], model: nn.Module, ladders: LadderSet | None, session, heads=None):
        self.variants, self.model, self.ladders, self.session, self.heads = variants, model, ladders, session, heads
        self.lambdas = []
        self._seen, self._step = [], None  # the per-variant losses of the step in progress, per micro-batch

    def trained(self, k: int) -> list:
        """Variant k's trainable weights: its ladder's and its head's."""
        parts = [owner[k] for owner in (self.ladders and self.ladders.ladders, self.heads and self.heads.heads) if owner]
        return [p for part in parts for p in part.parameters() if p.requires_grad]

    def param_groups(self, inside: list) -> list[dict]:
        from restune_sd.optimizers import optimizer_arguments

        groups = [{"params": self.trained(k), **optimizer_arguments(variant.cfg)} for k, variant in enumerate(self.variants)]
        if {id(p) for group in groups for p in group["params"]} != {id(p) for p in inside}:
            raise RuntimeError("a sweep trains its ladders' and heads' weights alone")
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
        for k, variant in enumerate(self.variants):
            if variant.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.trained(k), variant.cfg.max_grad_norm)

    @contextlib.contextmanager
    def as_variant(self, k: int):
        """The model as if it carried variant k's tuner alone (its ladder, head, names and config), for saving it."""
        model, tuned = self.model, self.model.restune
        if self.ladders is not None:
            model.restune_bypass.ladder = self.ladders.ladders[k]
        if self.heads is not None:
            model.classifier = self.heads.heads[k]
        params = list(model.named_parameters())
        names = [name for name, _ in params if name.startswith(LADDER + ".")]
        heads = [name for name, p in params if name.startswith("classifier.") and p.requires_grad] if self.heads else []
        model.restune = dataclasses.replace(tuned, config=self.variants[k].tuning, param_names=names, head_names=heads)
        try:
            yield model
        finally:
            if self.ladders is not None:
                model.restune_bypass.ladder = self.ladders
            if self.heads is not None:
                model.classifier = self.heads
            model.restune = tuned

    def write_tuners(self, folder: Path, extra: dict, hint: str, ema=None) -> None:
        """Each variant's tuner in FOLDER/<variant>/, the folder `sample --tuner` loads, as trained alone."""
        from restune_sd.checkpoints import write_tuner

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

    def results(self, scores: dict[str, list] | None = None) -> dict:
        """Each variant's final and mean loss (the last 10 steps), its `scores` (name -> one value per variant, e.g. a
        ViT's top1) and tuner folder; also written as RUN_DIR/sweep.md."""
        from restune_sd.runfolder import read_metrics

        run = self.session.run
        history = read_metrics(run / "metrics.jsonl")
        table = {}
        for k, variant in enumerate(self.variants):
            losses = [h[f"loss/{variant.name}"] for h in history if f"loss/{variant.name}" in h]
            table[variant.name] = {"settings": variant.settings, "final_loss": losses[-1] if losses else None,
                                   "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                                   **{score: values[k] for score, values in (scores or {}).items()},
                                   "tuner_dir": str(run / "tuner" / variant.name),
                                   **({"ema_tuner_dir": str(run / "tuner" / f"{variant.name}-ema")}
                                      if self.session.ema else {})}
        write_text_atomic(run / "sweep.md", sweep_table(table))
        return {"variants": table}


def sweep_table(table: dict) -> str:
    """The variants' results as a Markdown table: the highest top-1 marked where they were scored, else the lowest mean
    loss."""
    scored = all("top1" in row for row in table.values())
    key, pick, mark = ("top1", max, "highest top-1") if scored else ("mean_loss_last_10", min, "lowest")
    values = {name: row[key] for name, row in table.items() if row[key] is not None}
    best = pick(values, key=values.get) if values else None
    top1 = ("top-1 | ", "---|") if scored else ("", "")
    lines = [f"# Sweep: {len(table)} variants on one frozen forward per step", "",
             f"| variant | settings | final loss | mean loss (last 10) | {top1[0]}tuner |", f"|---|---|---|---|{top1[1]}---|"]
    for name, row in table.items():
        settings = ", ".join(f"{key}={value}" for key, value in row["settings"].items())
        number = lambda x: "-" if x is None else f"{x:.6g}"  # noqa: E731
        shown = f" ({mark})" if name == best else ""
        score = f"{number(row['top1'])} | " if scored else ""
        lines.append(f"| {name}{shown} | {settings} | {number(row['final_loss'])} | "
                     f"{number(row['mean_loss_last_10'])} | {score}tuner/{name} |")
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


class LastStem(nn.Module):
    """A ViT linear variant's place among the ladders: the last layer's class token, what its head reads alone."""

    def forward(self, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        return stems[-1]


def attach_ladders(model: nn.Module, tunings: list[TuningConfig], seed: int | torch.Tensor) -> LadderSet:
    """K ladders in place of the one on `model`'s bypass hooks (attached with a bypass tuning), each initialised as
    when trained alone: from `seed`, the run's, or from a CPU RNG state (a ViT's: its new head drew first)."""
    from restune_sd.inject import unet_ladder, vit_ladder

    make = vit_ladder if model.restune.backbone == "vit" else unet_ladder
    after, ladders = torch.get_rng_state(), []
    for tuning in tunings:
        torch.set_rng_state(seed) if isinstance(seed, torch.Tensor) else torch.manual_seed(seed)
        ladders.append(make(model, tuning.bypass) if tuning.bypass else LastStem())
    torch.set_rng_state(after)  # what follows draws as after the one tuner's attach
    ladders = LadderSet(ladders, recompute=model.restune.backbone != "vit").to(next(model.parameters()).device)
    model.restune_bypass.ladder = ladders
    model.restune.param_names = [name for name, p in model.named_parameters() if p.requires_grad]
    return ladders


def swept(job, session, variants: list[Variant]):
    """`job` with K ladders on its backbone's one set of bypass hooks, each initialised as when trained alone."""
    if job.sample_losses is None or job.trains is not None:
        raise UserError("--sweep cannot train this job: its loss does not split by variant; leave --sweep out")
    model = job.model
    ladders = attach_ladders(model, [variant.tuning for variant in variants], session.cfg.seed)
    return sweeping(job, Sweep(variants, model, ladders, session), VariantRows(model, len(variants), "sample"))


def sweeping(job, sweep: Sweep, trains: nn.Module | None = None, scored: nn.Module | None = None, scores=()):
    """`job` training `sweep`'s variants: its per-sample losses split by variant, each variant's loss and learning
    rate every step, their table at the end. `trains`: what the loss calls (None: as the job has it); `scored`: what
    the job's finish is handed (None: the model); `scores`: its results that hold one value per variant."""
    on_step, finish = job.on_step, job.finish

    def each_step(step: int, last_checkpoint, final: bool) -> dict:
        return {**((on_step(step, last_checkpoint, final) if on_step else None) or {}), **sweep.metrics(step)}

    def finishing(trained) -> dict:
        done = finish(trained if scored is None else scored) if finish else {}
        table = sweep.results({score: done.pop(score) for score in scores})
        return {**done, **table}

    return dataclasses.replace(job, loss=sweep.loss(job.sample_losses), trains=job.trains if trains is None else trains,
                               on_step=each_step, finish=finishing, sweep=sweep)
