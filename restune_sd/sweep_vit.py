"""`classify train --sweep`: K ViT variants (bypass ladders, or heads alone for `linear`) trained on one frozen forward a
step, or on taps cached once (taps.py), each with its own classification head initialised as when trained alone."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from restune_sd.sweep import Sweep, VariantRows, attach_ladders, sweeping, variants_of

HEAD = "classifier."  # the ViT's head, by parameter name (inject.HEAD)


class HeadSet(nn.Module):
    """K classification heads in the place of the ViT's one: head k scores the k-th block of rows (variant k's ladder
    output), or with `shared` every row (linear variants alone all read the same features)."""

    def __init__(self, heads: list[nn.Module], shared: bool):
        super().__init__()
        self.heads, self.shared = nn.ModuleList(heads), shared

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        blocks = [features] * len(self.heads) if self.shared else features.chunk(len(self.heads))
        return torch.cat([head(block) for head, block in zip(self.heads, blocks)])


def class_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's cross-entropy, [K, B], from K*B rows of logits (variant k's the k-th block; K = 1 without a sweep):
    what loop.Job.sample_losses hands a sweep."""
    rows = logits.float().unflatten(0, (-1, labels.shape[0]))
    return F.cross_entropy(rows.flatten(0, 1), labels.repeat(rows.shape[0]), reduction="none").view(rows.shape[:2])


def sweep_variants(session) -> list:
    """The run's variants ([] without --sweep). The backbone is built with the first bypass variant's tuner (its hooks
    serve every ladder), or the first variant's where all are linear."""
    if not session.cfg.sweep:
        return []
    variants = variants_of(session.cfg, "vit")
    session.tuning = next((variant.tuning for variant in variants if variant.tuning.bypass), variants[0].tuning)
    return variants


def install_variants(model, variants: list, session, start: torch.Tensor) -> Sweep:
    """The variants' ladders and heads on `model` (tuned with `session.tuning`): each ladder initialised from `start`,
    the CPU RNG state the tuner's own attach drew from, and each head a copy of the new head (every run alone draws
    the same one), so each variant starts as it would alone."""
    bypass = model.restune.config.bypass
    ladders = attach_ladders(model, [variant.tuning for variant in variants], start) if bypass else None
    heads = [copy.deepcopy(model.classifier).requires_grad_(variant.tuning.train_head) for variant in variants]
    model.classifier = HeadSet(heads, shared=ladders is None)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    model.restune.param_names = [name for name in trained if not name.startswith(HEAD)]
    model.restune.head_names = [name for name in trained if name.startswith(HEAD)]
    return Sweep(variants, model, ladders, session, heads=model.classifier)


def swept_classifier(job, sweep: Sweep):
    """The classify job (on cached taps or not) training the sweep's variants; its finish scores each variant's top-1."""
    rows = VariantRows(job.model, len(sweep.variants), "logits")
    return sweeping(job, sweep, scored=rows, scores=("top1",))
