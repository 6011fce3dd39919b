"""Image transforms shared by training data, classify and FID: turn upright by the EXIF tag, resize the shorter side,
crop a square, map to [-1, 1]."""

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from restune_sd.errors import UserError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations whose upright picture is the stored one turned on its side


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: turned and mirrored as its EXIF Orientation tag says (phones store
    portrait photos sideways with such a tag). Decodes the image."""
    ImageOps.exif_transpose(image, in_place=True)
    return image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `upright(image)` from the file's header, without decoding the pixels."""
    # The base class's getexif reads the EXIF met in the header; PNG's own override decodes the whole image first.
    # (A PNG whose eXIf chunk follows its pixel data, which is rare, is sized as stored.)
    orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    return (image.height, image.width) if orientation in QUARTER_TURNS else image.size


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. PIL's own conversion clips 16-bit and float images to near white, so 16-bit ones
    (PIL reads them as I;16 or I) are scaled by 255/65535 and float ones must hold values in [0, 1]."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise UserError(f"a 32-bit image with values up to {pixels.max():.0f} has no known white level: "
                            "save it with 8 or 16 bits per channel")
        return Image.fromarray(np.round(pixels / 257).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            raise UserError(f"a float image with values in [{pixels.min():g}, {pixels.max():g}] has no known white level: "
                            "scale it to [0, 1] or save it with 8 or 16 bits per channel")
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def cover_size(image_size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """(width, height) of an image of `image_size` scaled as little as possible to cover `width` x `height`."""
    scale = max(width / image_size[0], height / image_size[1])
    return max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale))


def resize_to_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image scaled (bicubic, antialiased) as little as possible to cover `width` x `height`."""
    size = cover_size(image.size, width, height)
    if size == image.size:
        return image
    # PIL's resize widens its filter when shrinking, which is the antialiasing torchvision asks for explicitly.
    return image.resize(size, Image.Resampling.BICUBIC)


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """The image scaled (bicubic, antialiased) so that its shorter side is exactly `resolution` pixels."""
    return resize_to_cover(image, resolution, resolution)


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The centred `resolution` x `resolution` square of the image after resizing its shorter side to `resolution`."""
    image = resize_shorter_side(image, resolution)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor [3, H, W] in [-1, 1], the range the Stable Diffusion VAE expects."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div_(127.5).sub_(1.0)


class TrainTransform:
    """Resize, crop (centred or at a random offset) and optionally flip; every random draw comes from the caller's rng."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.apply(image, rng)[0]

    def place(self, image_size: tuple[int, int], rng: random.Random | None, size: tuple[int, int] | None = None,
              flip: bool | None = None) -> "Placement":
        """Where an image of `image_size` is cropped to `size` (width, height; default the square resolution) from,
        and whether it is flipped; `flip` decides the flip instead of `rng` (with centre crops nothing is drawn then:
        encoding ahead of training)."""
        width, height = size or (self.resolution, self.resolution)
        resized = cover_size(image_size, width, height)
        if self.center_crop:
            left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        else:
            left, top = rng.randint(0, resized[0] - width), rng.randint(0, resized[1] - height)
        flipped = flip if flip is not None else self.random_flip and rng.random() < 0.5
        return Placement(resized, (left, top, left + width, top + height), flipped)

    def apply(self, image: Image.Image, rng: random.Random | None, size: tuple[int, int] | None = None,
              flip: bool | None = None) -> tuple[torch.Tensor, bool]:
        """The image cropped to `size` (see place) as a tensor in [-1, 1], and whether it was flipped."""
        placement = self.place(image.size, rng, size, flip)
        return to_signed_tensor(placement.apply(image)), placement.flipped


@dataclass(frozen=True)
class Placement:
    """One training crop's geometry: the size the image is resized to, the box cropped from it and the flip; applied
    alike to an image and to its loss mask, so the two stay aligned pixel for pixel."""

    resized: tuple[int, int]  # (width, height)
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    flipped: bool

    def apply(self, image: Image.Image) -> Image.Image:
        if image.size != self.resized:
            # PIL's resize widens its filter when shrinking, the antialiasing torchvision asks for explicitly.
            image = image.resize(self.resized, Image.Resampling.BICUBIC)
        image = image.crop(self.box)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flipped else image
