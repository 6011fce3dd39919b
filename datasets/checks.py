"""Up-front checks of a data set's files on disk; each failure is a UserError naming the file and the fix."""

import os
from collections import defaultdict
from pathlib import Path

from restune_sd.errors import UserError


def require_root(root, prefix: str, expected: str) -> Path:
    """ROOT as a Path once it is known to be an existing folder; `expected` says what the folder should hold."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"{prefix}: data folder {root} does not exist: pass the folder that holds {expected}")
    if not root.is_dir():
        raise UserError(f"{prefix}: data root {root} is a file, not a folder: pass the folder that holds {expected}")
    return root


def descend(root: Path, marker: str, subfolder: str) -> Path:
    """ROOT, or ROOT/subfolder when the archive was extracted into its own folder and only that holds `marker`."""
    if not (root / marker).exists() and (root / subfolder / marker).exists():
        return root / subfolder
    return root


def require_file(path: Path, prefix: str, fix: str) -> Path:
    if not path.is_file():
        found = "is a folder, not a file" if path.is_dir() else "is missing"
        raise UserError(f"{prefix}: {path} {found}: {fix}")
    return path


def require_folder(path: Path, prefix: str, fix: str) -> Path:
    if not path.is_dir():
        found = "is a file, not a folder" if path.exists() else "is missing"
        raise UserError(f"{prefix}: {path} {found}: {fix}")
    return path


def read_lines(path: Path, prefix: str, fix: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of each non-blank line of a text file."""
    try:
        text = require_file(path, prefix, fix).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{prefix}: {path} is not a UTF-8 text file: {fix}") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_pairs(path: Path, prefix: str, fix: str) -> list[tuple[int, str, str]]:
    """(line number, first field, rest of line) of each line of a '<key> <value>' listing such as CUB's images.txt."""
    pairs = []
    for number, line in read_lines(path, prefix, fix):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise UserError(f"{prefix}: {path} line {number} should read '<id> <value>' but is {line!r}: {fix}")
        pairs.append((number, fields[0], fields[1].strip()))
    return pairs


def require_inside(paths: list[Path], root: Path, prefix: str) -> None:
    """Every listed path inside ROOT as written: a listing that names an absolute path or climbs out with '..' would
    read files a data set does not hold. (Links inside ROOT are the user's own layout and are followed.)"""
    top = os.path.normpath(os.path.abspath(root))
    for path in paths:
        if os.path.commonpath([top, os.path.normpath(os.path.abspath(path))]) != top:
            raise UserError(f"{prefix}: its listing names {path}, outside the data folder {root} (an absolute path or "
                            "'..'): list only images inside the data folder, with paths relative to it")


def require_images(paths: list[Path], prefix: str, fix: str, root: Path) -> None:
    """Raise when any listed image file is outside `root` or absent; one directory listing per folder keeps this fast
    for COCO."""
    require_inside(paths, root, prefix)
    wanted = defaultdict(list)
    for path in paths:
        wanted[path.parent].append(path)
    missing = []
    for folder, files in wanted.items():
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing += [path for path in files if path.name not in present]
    if missing:
        count = "1 image file it lists is" if len(missing) == 1 else f"{len(missing)} image files it lists are"
        raise UserError(f"{prefix}: {count} missing (first: {missing[0]}): {fix}")


def load_mat(path: Path, prefix: str, keys: tuple[str, ...], fix: str) -> dict:
    """A MATLAB file read with scipy (singleton dimensions squeezed), checked to hold `keys`."""
    import scipy.io

    require_file(path, prefix, fix)
    try:
        contents = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as error:  # scipy raises ValueError, MatReadError, OSError... for a damaged file
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{prefix}: {path} cannot be read as a MATLAB file ({reason}): {fix}") from None
    absent = [key for key in keys if key not in contents]
    if absent:
        raise UserError(f"{prefix}: {path} has no {', '.join(absent)} variable: {fix}")
    return contents
