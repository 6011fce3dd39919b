"""Image folders in kohya sd-scripts' `--train_data_dir` layout: sub-folders named `N_name` whose images count N times
per epoch, each image captioned by a same-name caption file (.caption, kohya's default, or .txt) or else by the folder's
`name`."""

from pathlib import Path

from restune_sd.datasets.checks import require_root
from restune_sd.datasets.finegrained import IMAGE_SUFFIXES
from restune_sd.datasets.masks import is_mask_file
from restune_sd.errors import UserError
from restune_sd.files import warn

MAX_REPEATS = 10_000  # kohya sets no bound; a larger N is a typo, and each repeat is an entry held in memory
MAX_EPOCH_SAMPLES = 10_000_000  # about a gigabyte of (image, caption) entries
# Without --caption-extension: kohya's default first, then the .txt that other trainers (and restune-sd before) read.
CAPTION_EXTENSIONS = (".caption", ".txt")


def folder_repeats(folder: Path) -> tuple[int, str] | None:
    """(N, name) of a folder named `N_name` (or just `N`, whose name is ""), split at the first "_" as kohya does;
    None where the part before it is not a number."""
    count, _, name = folder.name.partition("_")
    if not (count.isascii() and count.isdigit()):
        return None
    if int(count) > MAX_REPEATS:
        raise UserError(f"kohya: folder {folder} repeats its images {int(count):,} times, more than {MAX_REPEATS:,}: "
                        f"rename it with a smaller N (e.g. 10_{name})")
    return int(count), name.strip()


def read_caption(image: Path, extensions: tuple[str, ...]) -> str | None:
    """The first line of the first caption file beside `image` with one of `extensions` (kohya reads only that line),
    or None when there is none."""
    path = next((p for p in (image.with_suffix(extension) for extension in extensions) if p.is_file()), None)
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"kohya: caption file {path} is not UTF-8 text: save it as UTF-8") from None
    if not lines or not lines[0].strip():
        raise UserError(f"kohya: caption file {path} is empty or starts with a blank line: write the caption on line 1")
    return lines[0].strip()


def images_in(folder: Path) -> list[Path]:
    """The training images in `folder`: not hidden files, nor --masked-loss masks (<stem>.mask.png)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and not is_mask_file(p) and p.is_file())


def count(things: list, what: str) -> str:
    return f"{len(things)} {what}{'' if len(things) == 1 else 's'}"


def repeated_folders(root: Path) -> list[tuple[Path, int, str, list[Path]]]:
    """Each `N_name` sub-folder with N >= 1 and its images; what kohya skips (images directly in ROOT, other
    sub-folders, N = 0) is skipped here too, with a warning line."""
    folders, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = folder_repeats(folder)
        if parsed is None or parsed[0] < 1:
            skipped.append(folder)
        else:
            folders.append((folder, *parsed, images_in(folder)))
    if skipped:
        warn(f"kohya: skipped {count(skipped, 'sub-folder')} whose name is not N_name with N >= 1 repeats, as kohya "
             f"skips them (first: {skipped[0]}): rename a folder e.g. 10_name to train on its images")
    loose = images_in(root)
    if loose:
        warn(f"kohya: skipped {count(loose, 'image')} directly in {root}, as kohya reads only its N_name sub-folders "
             f"(first: {loose[0].name}): move them into one (e.g. 1_name) to train on them")
    samples = sum(repeats * len(images) for _, repeats, _, images in folders)
    if samples > MAX_EPOCH_SAMPLES:
        folder, repeats, _, images = max(folders, key=lambda f: f[1] * len(f[3]))
        raise UserError(f"kohya: one epoch of {root} holds {samples:,} samples, more than {MAX_EPOCH_SAMPLES:,} "
                        f"(folder {folder}: {len(images):,} images x {repeats:,}): lower the repeat counts N")
    return folders


def read_kohya_folder(root, split: str, caption_extension: str | None = None) -> list[tuple[Path, list[str]]]:
    """Images in ROOT's `N_name` sub-folders (not deeper, as kohya), each listed once per repeat of its folder.

    Captions are read from `caption_extension` files, or without one from .caption files, else .txt. An image without
    a caption file is captioned with its folder's name, as kohya does, with one warning line counting them; a data set
    where no image has a caption file nor a folder name to fall back on is refused (a wrong --caption-extension).
    """
    extensions = (caption_extension,) if caption_extension else CAPTION_EXTENSIONS
    described = " or ".join(extensions)
    root = require_root(root, "kohya", f"N_name sub-folders of images with {described} caption files")
    records, uncaptioned, seen = [], [], 0
    for folder, repeats, name, images in repeated_folders(root):
        seen += len(images)
        for image in images:
            caption = read_caption(image, extensions)
            if caption is None:
                uncaptioned.append(image)
            records += [(image, [name if caption is None else caption])] * repeats
    if not records:
        raise UserError(f"kohya: no images ({', '.join(IMAGE_SUFFIXES)}) in the N_name sub-folders of {root}: kohya "
                        f"reads images only from sub-folders named N_name (N repeats per epoch), e.g. {root / '10_dog'}")
    if uncaptioned and all(caption == [""] for _, caption in records):
        raise UserError(f"kohya: no image in {root} has a {described} caption file (first: {uncaptioned[0]}) "
                        "or a name after N_ in its folder's: pass --caption-extension with your caption files' "
                        "extension")
    if uncaptioned:
        warn(f"kohya: {count(uncaptioned, 'image')} of {seen} without a {described} caption file (first: "
             f"{uncaptioned[0]}): each is captioned with its folder's name after N_, as kohya does")
    return records
