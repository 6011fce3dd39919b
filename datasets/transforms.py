"""Image transforms shared by training data and FID: resize the shorter side, crop a square, map to [-1, 1]."""

import random

import numpy as np
import torch
from PIL import Image

from restune_sd.errors import UserError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """The image scaled (bicubic, antialiased) so that its shorter side is exactly `resolution` pixels."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size == image.size:
        return image
    # PIL's resize widens its filter when shrinking, which is the antialiasing torchvision asks for explicitly.
    return image.resize(size, Image.Resampling.BICUBIC)


def crop_square(image: Image.Image, resolution: int, left: int, top: int) -> Image.Image:
    return image.crop((left, top, left + resolution, top + resolution))


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The centred `resolution` x `resolution` square of the image after resizing its shorter side to `resolution`."""
    image = resize_shorter_side(image, resolution)
    width, height = image.size
    return crop_square(image, resolution, (width - resolution) // 2, (height - resolution) // 2)


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

    def apply(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, bool]:
        """The transformed image and whether it was flipped."""
        if self.center_crop:
            image = resize_center_crop(image, self.resolution)
        else:
            image = resize_shorter_side(image, self.resolution)
            width, height = image.size
            left, top = rng.randint(0, width - self.resolution), rng.randint(0, height - self.resolution)
            image = crop_square(image, self.resolution, left, top)
        flipped = self.random_flip and rng.random() < 0.5
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_signed_tensor(image), flipped
