"""Captioned image folders in the Hugging Face imagefolder convention: images plus metadata.jsonl."""

import json
from pathlib import Path

from restune_sd.datasets.checks import read_lines, require_images, require_root
from restune_sd.errors import UserError

LINE_FORMAT = 'each line must be {"file_name": "a.jpg", "text": "a caption"} ("caption" also works)'


def read_metadata_folder(root, split: str) -> list[tuple[Path, list[str]]]:
    """Images listed in ROOT/metadata.jsonl; a file listed on several lines (or with a list of texts) gets every
    caption, and one of them is drawn each time."""
    root = require_root(root, "folder", "images and a metadata.jsonl")
    metadata = root / "metadata.jsonl"
    fix = f"write {metadata}: {LINE_FORMAT} (for class sub-folders use classfolder:)"
    captions: dict[str, list[str]] = {}
    for number, line in read_lines(metadata, "folder", fix):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"folder: {metadata} line {number} is not valid JSON ({error.msg}): {LINE_FORMAT}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise UserError(f"folder: {metadata} line {number} has no \"file_name\" string: {LINE_FORMAT}")
        text = entry.get("text", entry.get("caption"))
        texts = text if isinstance(text, list) else [text]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise UserError(f"folder: {metadata} line {number} has no non-empty \"text\" (or \"caption\"): {LINE_FORMAT}")
        captions.setdefault(entry["file_name"], []).extend(t.strip() for t in texts)
    records = [(root / file_name, texts) for file_name, texts in captions.items()]
    require_images([path for path, _ in records], "folder", f"add them or drop their lines from {metadata}", root)
    return records
