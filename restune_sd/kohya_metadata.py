"""The training metadata kohya's sd-scripts writes into a LoRA file (`ss_*` keys, and the `sshs_*` hashes of the
additional-networks extension), as A1111, ComfyUI and civitai read it, built from a run's records; and what a diffusion
run records for it at its end (its captions' tags, when it started and finished)."""

import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

from restune_sd.bounds import MAX_RESOLUTION
from restune_sd.files import read_json, warn

MAX_TAGS = 10_000  # per folder, the most frequent: captions without commas would otherwise list every caption
LEGACY_HASH_SPAN = (0x100000, 0x10000)  # the old additional-networks hash reads 64 KiB from 1 MiB into the file


def tag_frequency(dataset) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency of a caption dataset: {image folder name: {tag: count}}. As kohya's set_tag_frequency
    counts them: each image once (not once per repeat), its captions split at commas, stripped and lower-cased."""
    counts: dict[str, Counter] = {}
    seen = set()
    for index, source in enumerate(dataset.paths):
        key = source if isinstance(source, Path) else index  # rows of a Hugging Face data set are never repeated
        if key in seen:
            continue
        seen.add(key)
        folder = source.parent.name if isinstance(source, Path) else Path(dataset.name.partition(":")[2]).name
        tags = counts.setdefault(folder or dataset.name, Counter())
        for caption in dataset.captions_of(index):
            tags.update(tag.strip().lower() for tag in caption.split(",") if tag.strip())
    return {folder: dict(tags.most_common(MAX_TAGS)) for folder, tags in counts.items()}


def training_record(dataset):
    """Job.finish for a diffusion run: results.json records the run's start (now, as kohya's ss_training_started_at:
    a resumed run's is its resumption), its end, its images (each repeat counted, as kohya's ss_num_train_images,
    class images of prior preservation not) and their captions' tags."""
    started = time.time()
    return lambda model: {"training_started_at": started, "training_finished_at": time.time(),
                          "num_train_images": len(dataset), "tag_frequency": tag_frequency(dataset)}


def base_model_version(unet_config, prediction_type: str | None = None) -> str:
    """kohya's ss_base_model_version for a UNet config: sdxl_base_v1-0 for SDXL (text_time added embeddings, 2048-wide
    cross-attention), else sd_v2 for a 1024-wide cross-attention and sd_v1 otherwise, `_v` appended for a v-prediction
    model as kohya's get_model_version_str_for_sd1_sd2 does (sd_v2_v for SD 2.x 768-v)."""
    if unet_config.get("addition_embed_type") == "text_time" or unet_config.get("cross_attention_dim") == 2048:
        return "sdxl_base_v1-0"
    version = "sd_v2" if unet_config.get("cross_attention_dim") == 1024 else "sd_v1"
    return version + ("_v" if prediction_type == "v_prediction" else "")


def addnet_hash(data: bytes) -> str:
    """kohya's addnet_hash_safetensors: the SHA-256 of a safetensors file's tensor bytes, after its 8-byte length and
    JSON header, so metadata added to the file later leaves it unchanged."""
    start = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[start:]).hexdigest()


def legacy_hash(data: bytes) -> str:
    """kohya's addnet_hash_legacy: the first 8 hex digits of the SHA-256 of 64 KiB from 1 MiB into the file (of no
    bytes in a smaller file)."""
    offset, length = LEGACY_HASH_SPAN
    return hashlib.sha256(data[offset:offset + length]).hexdigest()[:8]


def with_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` and the sshs_model_hash and sshs_legacy_hash that kohya's precalculate_safetensors_hashes computes:
    over the file as written with its ss_* keys alone."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return {**metadata, "sshs_model_hash": addnet_hash(data), "sshs_legacy_hash": legacy_hash(data)}


def run_records(folder: Path) -> tuple[dict, dict]:
    """The config.json and results.json of the run whose tuner/ folder is `folder` (empty where the tuner lies outside
    a run, or the run has not finished)."""
    if folder.name != "tuner":
        return {}, {}
    found = []
    for name in ("config.json", "results.json"):
        path = folder.parent / name
        record = read_json(path, "copy the run folder again, or export a copy of its tuner/ folder alone") if path.is_file() else {}
        found.append(record if isinstance(record, dict) else {})
    return found[0], found[1]


def is_whole(value, low: int, high: float) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def is_tag_frequency(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(folder, str) and isinstance(tags, dict) and len(tags) <= MAX_TAGS
        and all(isinstance(tag, str) and is_whole(count, 1, math.inf) for tag, count in tags.items())
        for folder, tags in value.items())


def model_name(model: str) -> str:
    """kohya's ss_sd_model_name: a local model's file or folder name, a hub id as it is."""
    return os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model


# What each run record gives: (file, field, check, ss_* key, the value written).
RECORDED = [
    ("config.json", "model", lambda v: isinstance(v, str) and 0 < len(v) <= 4096, "ss_sd_model_name", model_name),
    ("config.json", "resolution", lambda v: is_whole(v, 1, MAX_RESOLUTION), "ss_resolution", lambda v: (v, v)),
    ("results.json", "num_train_images", lambda v: is_whole(v, 0, math.inf), "ss_num_train_images", int),
    ("results.json", "training_started_at", is_time, "ss_training_started_at", float),
    ("results.json", "training_finished_at", is_time, "ss_training_finished_at", float),
    ("results.json", "tag_frequency", is_tag_frequency, "ss_tag_frequency", json.dumps),
]


def kohya_metadata(folder: Path, meta: dict, rank: int, alpha: float, output: Path) -> dict[str, str]:
    """The ss_* keys kohya writes for the LoRA tuner at `folder` (its saved config `meta`) exported to `output`: what
    the tuner says, and where it lies in a run's tuner/ folder what the run recorded. Values are strings, as safetensors
    metadata holds them; a run record that is not what restune-sd writes is left out with one warning line."""
    records = dict(zip(("config.json", "results.json"), run_records(folder)))
    found = {"ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": float(alpha),
             "ss_base_model_version": base_model_version(meta["backbone"]["signature"], meta.get("prediction_type")),
             "ss_output_name": output.stem, "ss_steps": meta.get("trained_steps")}
    wrong = []
    for file, field, fits, key, value in RECORDED:
        if field in records[file]:
            if fits(records[file][field]):
                found[key] = value(records[file][field])
            else:
                wrong.append(f"{file} {field}")
    if wrong:
        warn(f"{folder.parent}: left out of the file's metadata, not what restune-sd records: {', '.join(wrong)}")
    return {key: str(value) for key, value in found.items() if value is not None}
