"""The map-style dataset every layout builds: image files with captions, drawn reproducibly from (seed, epoch, index)."""

import random
import warnings
from pathlib import Path

import torch
from PIL import Image

from restune_sd.datasets.transforms import TrainTransform, to_rgb
from restune_sd.errors import UserError

# The errors PIL raises for a truncated, garbage or oversized file (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random draws of one item; a str seed goes through SHA-512, so no process-salted hash() is involved."""
    return random.Random(f"restune-sd/{seed}/{epoch}/{index}")


class CaptionDataset(torch.utils.data.Dataset):
    """Items `{"pixel_values": [3, R, R] in [-1, 1], "caption": str, "index": int}`.

    Which caption of several, the random crop offset and the flip are a pure function of (seed, epoch, index) and
    never touch global RNG state, so a resumed run draws exactly the same items. An image that fails to decode is
    replaced by the next good index (the item's "index" says which one was returned, "skipped" how many corrupt ones
    came before it) and counted in `num_corrupt`;
    with DataLoader workers each process keeps its own count.
    """

    def __init__(self, records: list[tuple[Path, list[str]]], *, name: str, resolution: int = 512,
                 center_crop: bool = True, random_flip: bool = False, seed: int = 0):
        self.paths = [Path(path) for path, _ in records]
        self._captions = [list(captions) for _, captions in records]
        self.name, self.seed, self.epoch = name, seed, 0
        self.transform = TrainTransform(resolution, center_crop, random_flip)
        self.num_corrupt = 0
        self._corrupt_indices: set[int] = set()
        self._first_corrupt: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def captions_of(self, index: int) -> list[str]:
        return list(self._captions[index])

    def corrupt_summary(self, indices: set[int] | None = None) -> str | None:
        """A line on the corrupt images among `indices` (default: those this process found); None if there are none."""
        indices = self._corrupt_indices if indices is None else indices
        if not indices:
            return None
        plural = "s" if len(indices) != 1 else ""
        return f"skipped {len(indices)} corrupt image{plural} (first: {self.paths[min(indices)]})"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        for step in range(len(self)):
            current = (index + step) % len(self)
            if current not in self._corrupt_indices and (image := self._decode(current)) is not None:
                break
        else:
            raise UserError(f"{self.name}: none of the {len(self)} images decodes (first: {self._first_corrupt}): "
                            "re-download or re-extract the data set")
        rng = item_rng(self.seed, self.epoch, current)
        captions = self._captions[current]
        caption = captions[rng.randrange(len(captions))]
        pixels, flipped = self.transform.apply(image, rng)
        return {"pixel_values": pixels, "caption": caption, "index": current, "flipped": flipped,
                "skipped": (current - index) % len(self)}

    def _decode(self, index: int) -> Image.Image | None:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return to_rgb(image)
        except DECODE_ERRORS as error:
            self._corrupt_indices.add(index)
            self.num_corrupt += 1
            if self._first_corrupt is None:
                self._first_corrupt = path
                warnings.warn(f"{self.name}: skipping corrupt image {path} ({error}); later ones are skipped "
                              "silently and counted in corrupt_summary()", stacklevel=3)
            return None
