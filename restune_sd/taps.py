"""Cached taps: with a bypass or a linear head, all a ViT classifier's trainable part reads from the frozen ViT is each
image's class token at fixed layers (its taps), the same at every epoch when nothing random touches the image. `classify
train` then computes them once (`CachedTaps`) and trains on them (`TapClassifier`), the backbone's forward skipped."""

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from restune_sd.bypass import Tap
from restune_sd.errors import UserError
from restune_sd.files import writing
from restune_sd.inject import class_token
from restune_sd.sweep_vit import class_losses

CACHE_TAPS = ("auto", "yes", "no")
FOLDER = "taps"  # in the run folder: each process's share of the taps, one safetensors file each
MEMORY_LIMIT = 2**30  # bytes of taps held in memory; more stay in their files and each item is read from there


def reads(tuning) -> str | None:
    """What a tuner's trainable part reads from the frozen ViT: "ladder" (a bypass: the class token of the first layer's
    input and of every layer's output), "last" (a head alone: of the last layer's output), None (tuners inside it)."""
    if tuning.bypass:
        return "ladder"
    if not (tuning.tuners or tuning.lora or tuning.full):
        return "last"
    return None


def why_uncached(cfg, tuning, vit, crops: bool) -> str | None:
    """Why a training image's taps change from step to step, in words; None where they never do."""
    if reads(tuning) is None:
        return f"tuner {cfg.tuner!r} works inside the frozen ViT (only bypass and linear read fixed features from it)"
    if cfg.random_flip:
        return "--random-flip flips each image anew every epoch"
    if crops:
        return f"{str(cfg.data).partition(':')[0]} follows VPT's FGVC protocol: a random crop of each image every epoch"
    rates = {name: float(getattr(vit.config, name, 0.0) or 0.0)
             for name in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    if any(rates.values()) or any(isinstance(m, nn.Dropout) and m.p > 0 for m in vit.vit.modules()):
        named = ", ".join(f"{name} {rate}" for name, rate in rates.items())
        return f"the frozen ViT has dropout ({named}), so its features differ at every step"
    return None


def caches_taps(cfg, tuning, vit, crops: bool, images: int, processes: int) -> bool:
    """--cache-taps decided: yes where nothing random touches the taps (else `yes` is one line); auto also needs the run
    to draw at least as many images as it would compute taps for. A note says why a bypass or linear run does not."""
    reason = why_uncached(cfg, tuning, vit, crops)
    if cfg.cache_taps == "yes" and reason:
        raise UserError(f"--cache-taps yes: {reason}; use --cache-taps auto or no")
    if cfg.cache_taps == "no" or reads(tuning) is None:
        return False
    if reason:
        note(f"the frozen ViT runs at every step (taps not cached): {reason}")
        return False
    group = cfg.batch_size * cfg.gradient_accumulation * processes
    drawn = (cfg.max_steps or cfg.epochs * max(1, images // group)) * group
    if cfg.cache_taps == "auto" and drawn < images:
        note(f"taps not cached: the run draws {drawn} images, fewer than the {images} training images whose taps it "
             "would compute (--cache-taps yes computes them anyway)")
        return False
    return True


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


class TapClassifier(nn.Module):
    """The tuned ViT after its frozen layers, on cached taps: the bypass ladder (if any), the final layer norm and the
    head; the very modules of `vit`, so what trains here is what it saves."""

    def __init__(self, vit):
        super().__init__()
        bypass = getattr(vit, "restune_bypass", None)
        self.ladder = bypass.ladder if bypass is not None else None
        self.layernorm, self.classifier = vit.vit.layernorm, vit.classifier

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """Logits of taps [B, K, C]: with a ladder the root's class token then each stem's, else the last layer's."""
        tokens = [token.contiguous() for token in taps.unsqueeze(2).unbind(1)]  # [B, 1, C] each, as Tap keeps them
        hidden = self.ladder(tokens[0], tokens[1:]) if self.ladder is not None else tokens[-1]
        return self.classifier(self.layernorm(hidden)[:, 0, :])


class CachedTaps(torch.utils.data.Dataset):
    """A training set's items with the image's taps in place of its pixels: `{"taps": [K, C], "label", "index",
    "skipped"}` as the image's own item has them. Empty until `compute` (every process, before the first step)."""

    def __init__(self, images, folder: Path):
        self.images, self.folder = images, Path(folder)
        self.classes, self.num_classes = images.classes, images.num_classes
        self.taps = None  # [N, K, C] when held in memory
        self.fields = {}  # label, index, skipped: [N] each
        self.files, self.rows = [], None  # read from the files: the files and each image's (file, row) in them
        self._opened = {}  # (process id, file) -> an open safetensors file
        self.seconds = 0.0  # how long computing them took, loading included

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        pass  # nothing random: every epoch's items are the same

    def corrupt_summary(self, indices: set[int] | None = None) -> str | None:
        return self.images.corrupt_summary(indices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": {}}  # open files stay in the process that opened them

    def __getitem__(self, position: int) -> dict:
        item = {name: int(values[position]) for name, values in self.fields.items()}
        if self.taps is not None:
            return {"taps": self.taps[position], **item}
        file, row = self.rows[position]
        key = (os.getpid(), file)
        if key not in self._opened:
            from safetensors import safe_open

            self._opened[key] = safe_open(str(self.files[file]), framework="pt")
        return {"taps": self._opened[key].get_slice("taps")[row:row + 1][0], **item}

    def shard(self, rank: int) -> Path:
        return self.folder / f"process-{rank}.safetensors"

    @torch.no_grad()
    def compute(self, vit, which: str, session, batch_size: int, num_workers: int) -> None:
        """Every image's taps, this process taking every N-th batch of them, with the backbone as a training step runs
        it (same precision, same mode); each process's share goes to its file, then every process loads them all."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        started = time.time()
        accelerator = session.accelerator
        rank, world, size = accelerator.process_index, accelerator.num_processes, len(self.images)
        mine = [i for start in range(rank * batch_size, size, world * batch_size)
                for i in range(start, min(start + batch_size, size))]
        layers = list(vit.vit.layers)
        tap = Tap(select=class_token)
        handles = tap.attach(layers[0], layers if which == "ladder" else [layers[-1]])
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.images, mine), batch_size=batch_size,
                                             num_workers=num_workers)
        parts = {"taps": [], "label": [], "index": [], "skipped": []}
        was_training = vit.training
        vit.train()  # as the uncached run's steps have it (nothing in it is random: why_uncached says so)
        try:
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed: the run's own draws stay as they were
                for batch in tqdm(loader, desc="computing taps", unit="batch", disable=not accelerator.is_main_process):
                    with accelerator.autocast():
                        vit.vit(pixel_values=batch["pixel_values"].to(session.device))
                    root, stems = tap.take()
                    parts["taps"].append(torch.cat(([root] if which == "ladder" else []) + stems, dim=1).cpu())
                    for name in ("label", "index", "skipped"):
                        parts[name].append(batch[name])
        finally:
            for handle in handles:
                handle.remove()
            vit.train(was_training)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard(rank).unlink(missing_ok=True)  # an earlier attempt's share is never read as this one's
        if mine:
            share = {name: torch.cat(values).contiguous() for name, values in parts.items()}
            with writing(self.shard(rank), "choose an --output with free space, or pass --cache-taps no"):
                save_file({**share, "requested": torch.tensor(mine, dtype=torch.int64)}, str(self.shard(rank)))
        accelerator.wait_for_everyone()
        self.load(world)
        accelerator.wait_for_everyone()
        if self.taps is not None and accelerator.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)  # all in memory now
        self.seconds = time.time() - started

    def load(self, world: int) -> None:
        """The processes' files: into memory up to MEMORY_LIMIT bytes of taps, else each image's place in them."""
        from safetensors import safe_open

        self.files = [self.shard(rank) for rank in range(world) if self.shard(rank).is_file()]
        size = len(self.images)
        fields = {name: torch.zeros(size, dtype=torch.int64) for name in ("label", "index", "skipped")}
        rows = [None] * size
        in_memory = sum(path.stat().st_size for path in self.files) <= MEMORY_LIMIT
        taps = None
        for file, path in enumerate(self.files):
            with safe_open(str(path), framework="pt") as saved:
                requested = saved.get_tensor("requested")
                for name in fields:
                    fields[name][requested] = saved.get_tensor(name)
                if in_memory:
                    share = saved.get_tensor("taps")
                    taps = share.new_empty((size, *share.shape[1:])) if taps is None else taps
                    taps[requested] = share
                for row, position in enumerate(requested.tolist()):
                    rows[position] = (file, row)
        if any(row is None for row in rows):
            raise RuntimeError(f"the taps in {self.folder} miss {rows.count(None)} of {size} training images")
        self.fields, self.taps, self.rows = fields, taps, None if in_memory else rows

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def with_cached_taps(job, session, crops: bool, batch_size: int):
    """`job` training on cached taps where --cache-taps decides so (results.json says `cached_taps`), else as it was."""
    cfg, vit, accelerator = session.cfg, job.model, session.accelerator
    cached = caches_taps(cfg, session.tuning, vit, crops, len(job.dataset), accelerator.num_processes)
    if not cached:
        return dataclasses.replace(job, finish=lambda tuned: {**job.finish(tuned), "cached_taps": False})
    taps = CachedTaps(job.dataset, session.run / FOLDER)
    device = session.device

    def loss(model, batch: dict, step: int) -> torch.Tensor:
        return F.cross_entropy(model(batch["taps"].to(device)).float(), batch["label"].to(device))

    def sample_losses(model, batch: dict, step: int) -> torch.Tensor:  # a sweep's, [K, B]
        return class_losses(model(batch["taps"].to(device)), batch["label"].to(device))

    def finish(tuned) -> dict:
        taps.remove()
        with accelerator.autocast():  # the ViT itself was not prepared, so its forward is not autocast by accelerate
            return {**job.finish(tuned), "cached_taps": True, "taps_seconds": taps.seconds}

    return dataclasses.replace(job, dataset=taps, loss=loss, sample_losses=sample_losses, trains=TapClassifier(vit),
                               finish=finish, prepare=lambda: taps.compute(vit, reads(session.tuning), session,
                                                                            batch_size, cfg.num_workers))
