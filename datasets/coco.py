"""COCO2017 captions: the training records (every caption of each image) and the fixed val2017 prompts for sampling."""

import contextlib
import io
import json
from pathlib import Path

from restune_sd.datasets.caption_dataset import item_rng
from restune_sd.datasets.checks import require_file, require_folder, require_images, require_root
from restune_sd.errors import UserError

COCO_FIX = "extract annotations_trainval2017.zip and {split}2017.zip from cocodataset.org into ROOT"


def captions_shape_problem(data) -> str | None:
    """What keeps `data` from being a COCO captions file, or None when it is one."""
    if not isinstance(data, dict):
        return f"the top level is a {type(data).__name__}, not an object"
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        return "it has no 'images' and 'annotations' lists"
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or not isinstance(image.get("file_name"), str):
            return f"image entry {str(image)[:60]} lacks an integer 'id' or a 'file_name'"
    for annotation in annotations:
        if not isinstance(annotation, dict) or "image_id" not in annotation or not isinstance(annotation.get("caption"), str):
            return f"annotation {str(annotation)[:60]} lacks an 'image_id' or a 'caption' string"
    return None


def load_captions(path: Path, split: str):
    """A pycocotools COCO index of a captions file whose shape was checked first (its progress prints silenced)."""
    from pycocotools.coco import COCO

    fix = COCO_FIX.format(split=split)
    try:
        data = json.loads(require_file(path, "coco", fix).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"coco: {path} is not valid JSON ({error}): {fix}") from None
    if problem := captions_shape_problem(data):
        raise UserError(f"coco: {path} is not a COCO captions file ({problem}): use annotations/captions_{split}2017.json "
                        "from annotations_trainval2017.zip")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def captioned_images(coco) -> list[tuple[int, str, list[str]]]:
    """(image id, file name, captions) of every image with at least one caption, sorted by image id."""
    rows = []
    for image_id in sorted(coco.imgs):
        captions = [a["caption"].strip() for a in coco.imgToAnns.get(image_id, []) if a["caption"].strip()]
        if captions:
            rows.append((image_id, coco.imgs[image_id]["file_name"], captions))
    return rows


def read_coco(root, split: str) -> list[tuple[Path, list[str]]]:
    """The images of train2017 or val2017 that have captions, each with all its captions (usually five)."""
    root = require_root(root, "coco", "annotations/ and train2017/ (or val2017/)")
    fix = COCO_FIX.format(split=split)
    coco = load_captions(root / "annotations" / f"captions_{split}2017.json", split)
    images = require_folder(root / f"{split}2017", "coco", fix)
    records = [(images / file_name, captions) for _, file_name, captions in captioned_images(coco)]
    require_images([path for path, _ in records], "coco", fix, images)
    return records


def coco_val_items(root, num_images: int, seed: int = 0, at_most: bool = False) -> list[tuple[str, str]]:
    """(file name, caption) of the first `num_images` captioned val2017 images by image id (`at_most`: or all of them
    if there are fewer), one caption each drawn from (seed, image id). Only the annotations file is read: the images
    need not be present."""
    if num_images < 1:
        raise UserError(f"coco: the number of val2017 images must be at least 1, not {num_images}")
    root = require_root(root, "coco", "annotations/captions_val2017.json")
    path = root / "annotations" / "captions_val2017.json"
    rows = captioned_images(load_captions(path, "val"))
    if num_images > len(rows) and not at_most:
        raise UserError(f"coco: {num_images} images asked for, but {path} captions only {len(rows)}: ask for fewer")
    items = []
    for image_id, file_name, captions in rows[:num_images]:
        rng = item_rng(seed, 0, image_id)
        items.append((file_name, captions[rng.randrange(len(captions))]))
    return items
