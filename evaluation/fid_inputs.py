"""What `fid` reads before Inception runs, each checked first: the device and batch size, the images of a folder (a
`restune-sd sample` folder through its samples.jsonl, every name confined to the folder) and each image, upright."""

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from restune_sd.bounds import require_number
from restune_sd.datasets.image_files import DECODE_ERRORS, decode_rgb, open_image
from restune_sd.datasets.transforms import resize_center_crop, upright_size
from restune_sd.errors import UserError
from restune_sd.runfolder import FolderLock

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_SIZE = 299
MAX_BATCH_SIZE = 1024  # Inception on 1024 images at 299 px already takes tens of GB of activations
DEVICES = "cpu, cuda, cuda:N or mps"
SAMPLES_FORMAT = 'each line {"file": "NAME.png", ...} as `restune-sd sample` writes it, NAME a file in the folder'


def require_batch_size(batch_size) -> int:
    return require_number("--batch-size", batch_size, minimum=1, maximum=MAX_BATCH_SIZE, integer=True)


def require_device(name: str | None) -> torch.device:
    """--device as a device this machine has: cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(name)
    match = re.fullmatch(r"cpu|mps|cuda(?::(\d{1,3}))?", name)
    if match is None:
        raise UserError(f"cannot use device '{name}': --device takes {DEVICES}")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"cannot use device '{name}': this machine (or this torch build) has no CUDA device; "
                            "pass --device cpu")
        if match[1] is not None and int(match[1]) >= count:
            raise UserError(f"cannot use device '{name}': this machine has {count} CUDA device(s), "
                            f"--device cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("cannot use device 'mps': this machine has no Apple GPU; pass --device cpu")
    return torch.device(name)


def image_paths(folder, side: str) -> list[Path]:
    """The images directly in `folder`, sorted by name; at least two of them.

    A `restune-sd sample` output folder is read through its samples.jsonl, so its contact sheet is left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{side} folder {folder} {what}; give a folder of .png/.jpg/.jpeg/.webp images")
    require_finished_sample(folder, side)
    listing = folder / "samples.jsonl"
    if listing.is_file():
        paths = listed_images(folder, listing)
    else:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise UserError(f"{side} folder {folder} holds {len(paths)} image(s); FID needs at least 2 (thousands for a "
                        "meaningful figure)")
    return paths


def require_finished_sample(folder: Path, side: str) -> None:
    """A `restune-sd sample` folder only once its job is done: samples.jsonl is written after the last image, so a
    folder with the job's settings but no listing is still being sampled, or was stopped part way."""
    for held in (folder, folder.parent):  # sample --out holds OUT; several tuners sample into OUT/<tuner>
        holder = FolderLock.live_holder(held)
        if holder:
            raise UserError(f"{side} folder {folder} is being written by {holder}: wait for it to finish (FID over "
                            "part of the images is not the figure asked for)")
    if (folder / "sample_config.json").is_file() and not (folder / "samples.jsonl").is_file():
        raise UserError(f"{side} folder {folder} holds an unfinished `restune-sd sample` job (its sample_config.json "
                        "but no samples.jsonl, written after the last image): run the same sample command again to "
                        "finish it, then compute FID")


def listed_images(folder: Path, listing: Path) -> list[Path]:
    """The images samples.jsonl names, each once and inside `folder`; a torn or foreign line is an error, not skipped
    (FID over fewer images than were sampled is not the figure asked for)."""
    try:
        text = listing.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{listing} is not UTF-8 text: save it as UTF-8 ({SAMPLES_FORMAT}), or remove it to use "
                        f"every image in {folder}") from None
    inside = folder.resolve()
    paths = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{listing} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where} is not valid JSON ({error.msg}; cut short?): complete or delete that line, "
                            f"{SAMPLES_FORMAT}") from None
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where} names no image: {SAMPLES_FORMAT}")
        if Path(name).is_absolute():
            raise UserError(f"{where} names an absolute path {name!r}: {SAMPLES_FORMAT}")
        if ".." in Path(name).parts:
            raise UserError(f"{where} names {name!r}, which climbs out of {folder} with '..': {SAMPLES_FORMAT}")
        if not (folder / name).resolve().is_relative_to(inside):
            raise UserError(f"{where} names {name!r}, a link that leads outside {folder}: copy the image into the folder")
        if name in paths:
            raise UserError(f"{where} names {name!r} a second time (it would count twice): delete one of the lines")
        paths[name] = folder / name
    return list(paths.values())


def image_sizes(paths: list[Path]) -> set[tuple[int, int]]:
    """The distinct upright (width, height) of `paths`, read from the file headers; an unreadable file (a decompression
    bomb included) is an error naming it."""
    sizes = set()
    for path in paths:
        try:
            with open_image(path) as image:
                sizes.add(upright_size(image))
        except DECODE_ERRORS as error:
            raise unreadable(path, error) from None
    return sizes


def load_image(path: Path, resolution: int | None = None, resize: str = "legacy-tensorflow") -> torch.Tensor:
    """One image, upright, as the uint8 [3, H, W] tensor torch-fidelity expects: optionally resized and centre-cropped
    to `resolution`, then with `resize="clean"` brought to 299x299 by PIL's bicubic filter as clean-fid does."""
    try:
        image = decode_rgb(Path(path))
    except DECODE_ERRORS as error:
        raise unreadable(path, error) from None
    if resolution is not None:
        image = resize_center_crop(image, resolution)
    if resize == "clean":
        image = image.resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def unreadable(path: Path, error: Exception) -> UserError:
    return UserError(f"cannot read image {path} ({first_line(error)}); remove or replace it")


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
