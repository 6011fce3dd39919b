"""The map-style dataset every captioned layout builds: image files with captions, drawn reproducibly from (seed, epoch,
index)."""

from pathlib import Path

import torch

from restune_sd.datasets.buckets import Buckets
from restune_sd.datasets.image_files import ImageFiles, image_size, item_rng  # noqa: F401 (item_rng: coco.py imports it from here)
from restune_sd.datasets.masks import Masks
from restune_sd.datasets.tags import TagOptions
from restune_sd.datasets.transforms import TrainTransform, to_signed_tensor


class CaptionDataset(ImageFiles):
    """Items `{"pixel_values": [3, H, W] in [-1, 1], "caption": str, "index": int}`.

    Which caption of several, the random crop offset, the flip, the caption dropout and the tags' order and dropout
    (`tags`, kohya's tag shuffling) are a pure function of (seed, epoch, index) and never touch global RNG state, so a
    resumed run draws exactly the same items. An image that fails to decode is replaced by the next good index (the
    item's "index" says which one was returned, "skipped" how many corrupt ones came before it) and counted in
    `num_corrupt`; with DataLoader workers each process keeps its own count.
    Items are squares of `resolution` pixels, or with `bucket_sizes` crops to the bucket of the index asked for (so a
    replacement image still fits its batch); `buckets` says which.
    With `masks` (--masked-loss) items also hold "mask": [1, H, W] in [0, 1], cropped and flipped as the image is.
    """

    def __init__(self, records: list[tuple[Path, list[str]]], *, name: str, resolution: int = 512,
                 center_crop: bool = True, random_flip: bool = False, seed: int = 0, caption_dropout: float = 0.0,
                 bucket_sizes: list[tuple[int, int]] | None = None, tags: TagOptions = TagOptions(),
                 masks: Masks | None = None):
        super().__init__([path for path, _ in records], name=name, seed=seed)
        self.masks = masks
        self._captions = [list(captions) for _, captions in records]
        self.transform = TrainTransform(resolution, center_crop, random_flip)
        self.caption_dropout, self.tags = caption_dropout, tags
        self.buckets = None
        if bucket_sizes:
            sizes = {path: image_size(path) for path in dict.fromkeys(self.paths)}  # a repeated image is read once
            self.buckets = Buckets.assign(bucket_sizes, [sizes[path] for path in self.paths])

    def captions_of(self, index: int) -> list[str]:
        return list(self._captions[index])

    def crop_size(self, index: int) -> tuple[int, int]:
        """(width, height) that item `index` is cropped to: its bucket's, or the square resolution."""
        if self.buckets:
            return self.buckets.sizes[self.buckets.of[index]]
        return self.transform.resolution, self.transform.resolution

    def fixed_item(self, index: int, flip: bool) -> tuple[int, torch.Tensor]:
        """The index actually read (corrupt images are passed over) and its centre crop at `index`'s size, flipped
        or not: what item `index` shows in any epoch with that flip, so its latent can be encoded ahead of training."""
        if not self.transform.center_crop:
            raise ValueError("random crops differ from epoch to epoch: they cannot be encoded ahead")
        current, image, _ = self.decode_from(index)
        return current, self.transform.apply(image, None, self.crop_size(index), flip=flip)[0]

    def __getitem__(self, index: int) -> dict:
        current, image, rng = self.decode_from(index)
        captions = self._captions[current]
        caption = captions[rng.randrange(len(captions))]
        size = self.buckets.sizes[self.buckets.of[index]] if self.buckets else None
        placement = self.transform.place(image.size, rng, size)
        pixels, flipped = to_signed_tensor(placement.apply(image)), placement.flipped
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""
        elif self.tags.active:  # drawn after everything else, so runs without it draw what they drew before
            caption = self.tags.apply(caption, rng)
        item = {"pixel_values": pixels, "caption": caption, "index": current, "flipped": flipped,
                "skipped": (current - index) % len(self)}
        if self.masks is not None:
            item["mask"] = self.masks.transformed(current, self.paths[current], image.size, placement)
        return item
