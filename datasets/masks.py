"""Loss masks for `train --masked-loss` (kohya's --masked_loss): one greyscale image per training image, read beside it
as `<stem>.mask.png` or from `--mask-dir` as `<stem>.png`, and resized, cropped and flipped exactly as its image is."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from restune_sd.datasets.image_files import DECODE_ERRORS, image_size
from restune_sd.datasets.transforms import Placement, to_rgb, upright, upright_size
from restune_sd.errors import UserError
from restune_sd.files import warn

MASK_SUFFIX = ".mask.png"  # img1.png or img1.jpg -> img1.mask.png beside it; never read as a training image


def is_mask_file(path: Path) -> bool:
    """Whether a file in an image folder is a loss mask (`<stem>.mask.png`), not a training image."""
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_file(source, mask_dir: Path | None) -> Path | None:
    """Where the mask of an image file lies (it may not exist); None for sources that are not files (hf: rows)."""
    if not isinstance(source, Path):
        return None
    return mask_dir / f"{source.stem}.png" if mask_dir else source.with_name(source.stem + MASK_SUFFIX)


def read_mask(path: Path) -> Image.Image:
    """The mask as 8-bit greyscale ("L": white 255 trains, black 0 is ignored); colour masks count by their luminance,
    an alpha channel is ignored. Turned upright by its own EXIF tag, as images are."""
    try:
        with Image.open(path) as image:
            image = upright(image)
            return image.copy() if image.mode == "L" else to_rgb(image).convert("L")
    except DECODE_ERRORS as error:
        raise UserError(f"mask {path} cannot be read ({error}): save it as a greyscale PNG") from None


def mask_size(path: Path) -> tuple[int, int]:
    """(width, height) of the upright mask from its header."""
    try:
        with Image.open(path) as image:
            return upright_size(image)
    except DECODE_ERRORS as error:
        raise UserError(f"mask {path} cannot be read ({error}): save it as a greyscale PNG") from None


def require_same_size(mask: Path, mask_wh: tuple[int, int], source, image_wh: tuple[int, int]) -> None:
    if mask_wh != image_wh:
        raise UserError(f"mask {mask} is {mask_wh[0]}x{mask_wh[1]} but its image {source} is {image_wh[0]}x"
                        f"{image_wh[1]}: save the mask at the image's size")


def to_unit_tensor(mask: Image.Image) -> torch.Tensor:
    """A greyscale mask as a float tensor [1, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(mask, dtype=np.float32) / 255.0).unsqueeze(0)


@dataclass(frozen=True)
class Masks:
    """The mask file of each dataset index; None where an image has none and trains on all of it (as kohya does)."""

    files: list[Path | None]

    @classmethod
    def find(cls, sources: list, mask_dir: str | None, name: str) -> "Masks":
        """Each source's mask, checked before training: the folder exists, some image has a mask, every mask has its
        image's size; images without one are counted in one warning line."""
        folder = None
        if mask_dir is not None:
            folder = Path(mask_dir).expanduser()
            if not mask_dir.strip() or not folder.is_dir():
                raise UserError(f"--mask-dir {mask_dir} is not a folder: pass the folder holding <image stem>.png "
                                "masks")
        found = {}
        for source in dict.fromkeys(sources):  # kohya's repeated images are looked at once
            candidate = mask_file(source, folder)
            found[source] = candidate if candidate is not None and candidate.is_file() else None
        where = f"as <stem>.png in {folder}" if folder else f"as <stem>{MASK_SUFFIX} beside its image"
        masked = [source for source, mask in found.items() if mask is not None]
        if not masked:
            raise UserError(f"--masked-loss: none of the {len(found)} images of {name} has a mask {where} (first "
                            f"image: {next(iter(found))}): add the masks, or leave --masked-loss out")
        if folder:  # images of different sub-folders may share a stem, and --mask-dir holds one mask per stem
            stems = {}
            for source in masked:
                if (other := stems.setdefault(source.stem, source)) != source:
                    raise UserError(f"--mask-dir: images {other} and {source} share the name {source.stem!r}, so "
                                    f"{found[source]} would mask both: rename one, or put masks beside the images")
        for source in masked:
            if (size := image_size(source)) is not None:  # an unreadable image is skipped as corrupt later
                require_same_size(found[source], mask_size(found[source]), source, size)
        unmasked = [source for source, mask in found.items() if mask is None]
        if unmasked:
            plural = "s" if len(unmasked) != 1 else ""
            warn(f"--masked-loss: {len(unmasked)} image{plural} of {len(found)} without a mask {where} (first: "
                 f"{unmasked[0]}): each trains on the whole image, as kohya does")
        return cls([found[source] for source in sources])

    def transformed(self, index: int, source, image_wh: tuple[int, int], placement: Placement) -> torch.Tensor:
        """Item `index`'s mask [1, H, W] in [0, 1] through its image's `placement`; all ones where it has none."""
        path = self.files[index]
        if path is None:
            width, height = placement.box[2] - placement.box[0], placement.box[3] - placement.box[1]
            return torch.ones(1, height, width)
        mask = read_mask(path)
        require_same_size(path, mask.size, source, image_wh)  # the files may have changed since find()
        return to_unit_tensor(placement.apply(mask))
