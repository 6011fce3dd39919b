"""Image folders in kohya sd-scripts' layout: each image captioned by a same-name text file, and sub-folders named
`N_name` whose images count N times per epoch."""

import re
from pathlib import Path

from restune_sd.datasets.checks import require_root
from restune_sd.datasets.finegrained import IMAGE_SUFFIXES
from restune_sd.errors import UserError
from restune_sd.files import warn

REPEATS = re.compile(r"(\d+)_(.*)")  # kohya's "10_sks dog": 10 repeats, class tokens "sks dog"


def folder_repeats(folder: Path, root: Path) -> tuple[int, str | None]:
    """How many times the folder's images count per epoch, and the caption of an image that has no caption file."""
    match = REPEATS.fullmatch(folder.name) if folder != root else None
    if not match:
        return 1, None
    if int(match[1]) < 1:
        raise UserError(f"kohya: folder {folder} repeats its images {match[1]} times: name it N_{match[2]} with N >= 1")
    return int(match[1]), match[2].strip() or None


def read_caption(image: Path, extension: str) -> str | None:
    """The first line of the caption file beside `image` (kohya reads only that), or None when there is none."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"kohya: caption file {path} is not UTF-8 text: save it as UTF-8") from None
    if not lines or not lines[0].strip():
        raise UserError(f"kohya: caption file {path} is empty or starts with a blank line: write the caption on line 1")
    return lines[0].strip()


def read_kohya_folder(root, split: str, caption_extension: str = ".txt") -> list[tuple[Path, list[str]]]:
    """Images in ROOT and its sub-folders (not deeper, as kohya), each listed once per repeat of its folder.

    An image without a caption file is captioned, as kohya does, with its N_name folder's name, and elsewhere with ""
    (unconditional), with one warning; a folder where no image has a caption file or a name to fall back on fails.
    """
    root = require_root(root, "kohya", f"images with {caption_extension} caption files, or N_name sub-folders of them")
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]
    records, uncaptioned = [], []
    for folder in folders:
        repeats, fallback = folder_repeats(folder, root)
        images = (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        for image in sorted(p for p in images if p.is_file()):
            caption = read_caption(image, caption_extension)
            if caption is None:
                uncaptioned.append(image)
            records += [(image, [caption if caption is not None else fallback or ""])] * repeats
    if not records:
        raise UserError(f"kohya: no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its sub-folders")
    if uncaptioned and all(caption == [""] for _, caption in records):
        raise UserError(f"kohya: no image in {root} has a {caption_extension} caption file (first: {uncaptioned[0]}) "
                        "or an N_name folder: pass --caption-extension to match yours (e.g. .caption)")
    if uncaptioned:
        count = "1 image has" if len(uncaptioned) == 1 else f"{len(uncaptioned)} images have"
        warn(f"kohya: {count} no {caption_extension} caption file (first: {uncaptioned[0]}); "
             "they are captioned with their N_name folder's name, or \"\" outside such folders")
    return records
