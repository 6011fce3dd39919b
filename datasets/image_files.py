"""The base of the training datasets: image files decoded on demand (upright, as their EXIF tag says), a corrupt one
skipped (replaced by the next good index) and counted, and per-item random draws that are a pure function of (seed,
epoch, index)."""

import random
import warnings
from pathlib import Path

import torch
from PIL import Image

from restune_sd.datasets.transforms import to_rgb, upright, upright_size
from restune_sd.errors import UserError

# The errors PIL raises for a truncated, garbage or oversized file (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(source) -> Image.Image:
    """An image file, or any other source with its own open() (such as a row of a Hugging Face dataset)."""
    return Image.open(source) if isinstance(source, Path) else source.open()


def image_size(source) -> tuple[int, int] | None:
    """(width, height) of the upright image from its header alone; None when it cannot be read."""
    try:
        with open_image(source) as image:
            return upright_size(image)
    except DECODE_ERRORS:
        return None


def decode_rgb(source) -> Image.Image:
    """The image decoded upright (turned as its EXIF Orientation tag says) as 8-bit RGB; raises DECODE_ERRORS."""
    with open_image(source) as image:
        return to_rgb(upright(image))


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random draws of one item; a str seed goes through SHA-512, so no process-salted hash() is involved."""
    return random.Random(f"restune-sd/{seed}/{epoch}/{index}")


class ImageFiles(torch.utils.data.Dataset):
    """Image files with the corrupt-image bookkeeping; subclasses build their items in __getitem__ from decode_from().

    With DataLoader workers each process keeps its own count, so items report how many corrupt images they skipped.
    """

    def __init__(self, paths: list, *, name: str, seed: int = 0):
        self.paths = [Path(path) if isinstance(path, str) else path for path in paths]  # files, or sources with open()
        self.name, self.seed, self.epoch = name, seed, 0
        self.num_corrupt = 0
        self._corrupt_indices: set[int] = set()
        self._first_corrupt: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def corrupt_summary(self, indices: set[int] | None = None) -> str | None:
        """A line on the corrupt images among `indices` (default: those this process found); None if there are none."""
        indices = self._corrupt_indices if indices is None else indices
        if not indices:
            return None
        plural = "s" if len(indices) != 1 else ""
        return f"skipped {len(indices)} corrupt image{plural} (first: {self.paths[min(indices)]})"

    def decode_from(self, index: int) -> tuple[int, Image.Image, random.Random]:
        """The first index from `index` on (wrapping round) whose image decodes, that RGB image, and its item_rng."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        for step in range(len(self)):
            current = (index + step) % len(self)
            if current not in self._corrupt_indices and (image := self._decode(current)) is not None:
                return current, image, item_rng(self.seed, self.epoch, current)
        raise UserError(f"{self.name}: none of the {len(self)} images decodes (first: {self._first_corrupt}): "
                        "re-download or re-extract the data set")

    def _decode(self, index: int) -> Image.Image | None:
        path = self.paths[index]
        try:
            return decode_rgb(path)
        except DECODE_ERRORS as error:
            self._corrupt_indices.add(index)
            self.num_corrupt += 1
            if self._first_corrupt is None:
                self._first_corrupt = path
                warnings.warn(f"{self.name}: skipping corrupt image {path} ({error}); later ones are skipped "
                              "silently and counted in corrupt_summary()", stacklevel=4)
            return None
