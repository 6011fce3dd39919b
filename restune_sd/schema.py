"""What a tuner's `tuner_config.json` may hold: every field with its type and bounds, and the checksum that covers it.

A tuner folder is received like any file, so its config is checked whole before any part of it is used; fields that
training adds (`save_tuner(..., extra=...)`) are listed here beside the ones save_tuner writes itself.
"""

import hashlib
import json
import math
import re
import reprlib

from restune_sd.bounds import MAX_RESOLUTION
from restune_sd.config import BACKBONES, TuningConfig
from restune_sd.errors import UserError
from restune_sd.text_encoder_lora import is_record as is_text_encoder_lora

FORMAT = "restune-sd-tuner/2"
# Format 1 (restune-sd 0.1) differs in two ways: its bypass ladder had no identity path between stages (a
# different function of the same weights, so such tuners are refused), and its lambda-gated and bound
# prefix/prompt tuners carried an unused scale (dropped on load).
FORMAT_1 = "restune-sd-tuner/1"
# The shape-defining config fields a tuner depends on, per backbone kind (see io.backbone_signature).
SIGNATURE_KEYS = {
    "unet": ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types", "up_block_types"),
    "vit": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "image_size"),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Far above any real model (ImageNet-21k has 21,843 classes; SD's widest block 1280), far below what exhausts memory.
MAX_LABELS = 100_000
MAX_SIZE = 1_000_000
MAX_TEXT = 4096
MAX_LIST = 64
MAX_PARAMS = 10**12
MAX_STEPS = 10**12
SHA256 = re.compile(r"[0-9a-f]{64}")
CHECKSUM_FIELD = "config_sha256"


def config_checksum(meta: dict) -> str:
    """The SHA-256 of a tuner config's canonical JSON (sorted keys, no spaces), its own checksum field left out."""
    canonical = json.dumps({k: v for k, v in meta.items() if k != CHECKSUM_FIELD}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_text(value, limit: int = MAX_TEXT) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def is_number(value, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


def is_signature_value(value) -> bool:
    if isinstance(value, list):
        return len(value) <= MAX_LIST and all(is_whole(v, 0, MAX_SIZE) or is_text(v, 100) for v in value)
    return value is None or is_whole(value, 0, MAX_SIZE) or is_text(value, 100)


def is_three_numbers(value, low: float, high: float) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(is_number(v, low, high) for v in value)


# The fields beside format, backbone, tuning and head: what each must be, in words and as a check.
FIELDS = {
    **{name: ("a whole number of parameters", lambda v: is_whole(v, 0, MAX_PARAMS))
       for name in ("tuner_params", "head_params", "trainable_params", "total_params")},
    "weights_sha256": ("a SHA-256 in hex", lambda v: isinstance(v, str) and SHA256.fullmatch(v)),
    CHECKSUM_FIELD: ("a SHA-256 in hex", lambda v: isinstance(v, str) and SHA256.fullmatch(v)),
    "trained_steps": ("a whole number of steps", lambda v: is_whole(v, 0, MAX_STEPS)),
    "data": (f"a data spec of at most {MAX_TEXT} characters", is_text),
    "resolution": (f"a whole number of pixels from 1 to {MAX_RESOLUTION}", lambda v: is_whole(v, 1, MAX_RESOLUTION)),
    "image_mean": ("three numbers from -10 to 10", lambda v: is_three_numbers(v, -10, 10)),
    "image_std": ("three numbers from 0.0001 to 10", lambda v: is_three_numbers(v, 1e-4, 10)),
    "prediction_type": (f"one of {', '.join(PREDICTION_TYPES)}", lambda v: v in PREDICTION_TYPES),
    "resize_crop": ("true or false", lambda v: isinstance(v, bool)),
    "clip_skip": ("a whole number of text encoder layers from 0 to 1000", lambda v: is_whole(v, 0, 1000)),
    "zero_terminal_snr": ("true or false", lambda v: isinstance(v, bool)),
    "text_encoder_lora": ("a text-encoder LoRA's rank, alpha, targets, params and weights_sha256",
                          is_text_encoder_lora),
}


def check_tuner_config(meta, where: str) -> dict:
    """`meta` (a tuner_config.json as read) if it matches the schema and its checksum; a UserError naming `where` and
    the first wrong field otherwise. Tuners saved before the checksum existed (no config_sha256) are checked by schema."""

    def wrong(field: str, what: str, value) -> UserError:
        return UserError(f"tuner config {where}: {field} must be {what}, not {reprlib.repr(value)}; copy the tuner "
                         "folder again (its config is damaged or was edited)")

    if not isinstance(meta, dict):
        raise UserError(f"tuner config {where} holds a {type(meta).__name__}, not a mapping: copy the tuner folder again")
    if meta.get("format") not in (FORMAT, FORMAT_1):
        raise UserError(f"tuner config {where}: unknown tuner format {reprlib.repr(meta.get('format'))} (expected {FORMAT})")
    checksum = meta.get(CHECKSUM_FIELD)
    if checksum is not None and checksum != config_checksum(meta):
        raise UserError(f"tuner config {where} is damaged or was edited: it does not match its {CHECKSUM_FIELD}; copy "
                        "the tuner folder again")
    unknown = sorted(set(meta) - {"format", "backbone", "tuning", "head", *FIELDS})
    if unknown:
        raise UserError(f"tuner config {where}: unknown field(s) {reprlib.repr(unknown)}; copy the tuner folder again, "
                        "or load it with the restune-sd version that saved it")
    for field in ("backbone", "tuning"):
        if field not in meta:
            raise UserError(f"tuner config {where} has no {field}: copy the tuner folder again")
    kind = check_backbone(meta["backbone"], wrong)
    try:
        TuningConfig.from_dict(meta["tuning"])
    except UserError as error:
        raise UserError(f"tuner config {where}: tuning: {str(error).removeprefix('config: ')}") from None
    for field, (what, fits) in FIELDS.items():
        if field in meta and not fits(meta[field]):
            raise wrong(field, what, meta[field])
    if "text_encoder_lora" in meta and kind != "unet":
        raise UserError(f"tuner config {where}: a {kind} tuner has no text encoder: copy the tuner folder again")
    if "head" in meta:
        if kind != "vit":
            raise UserError(f"tuner config {where}: a {kind} tuner has no classification head: copy the tuner folder again")
        check_head(meta["head"], wrong)
    image_size = meta["backbone"]["signature"].get("image_size")
    if kind == "vit" and "resolution" in meta and meta["resolution"] != image_size:
        raise wrong("resolution", f"the ViT's image size {image_size}", meta["resolution"])
    return meta


def check_backbone(backbone, wrong) -> str:
    """The backbone's kind, once its kind, class name and signature fit the schema."""
    if not isinstance(backbone, dict) or set(backbone) != {"kind", "class", "signature"}:
        raise wrong("backbone", "a mapping of kind, class and signature", backbone)
    kind = backbone["kind"]
    if kind not in BACKBONES:
        raise wrong("backbone.kind", f"one of {', '.join(BACKBONES)}", kind)
    if not (is_text(backbone["class"], 100) and backbone["class"].isidentifier()):
        raise wrong("backbone.class", "a class name", backbone["class"])
    signature = backbone["signature"]
    if not isinstance(signature, dict) or set(signature) != set(SIGNATURE_KEYS[kind]):
        raise wrong("backbone.signature", f"a mapping of {', '.join(SIGNATURE_KEYS[kind])}", signature)
    for key, value in signature.items():
        if not is_signature_value(value):
            raise wrong(f"backbone.signature.{key}", "a number, a name or a short list of them", value)
    return kind


def check_head(head, wrong) -> None:
    """A classification head: its class count, and a name for each label 0 .. count-1."""
    if not isinstance(head, dict) or set(head) != {"num_labels", "id2label"}:
        raise wrong("head", "a mapping of num_labels and id2label", head)
    count = head["num_labels"]
    if not is_whole(count, 1, MAX_LABELS):
        raise wrong("head.num_labels", f"a whole number from 1 to {MAX_LABELS}", count)
    id2label = head["id2label"]
    if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(count)}:
        raise wrong("head.id2label", f"a name for each label 0 to {count - 1}", id2label)
    name = next((v for v in id2label.values() if not is_text(v, 1000)), None)
    if name is not None:
        raise wrong("head.id2label", "names of 1 to 1000 characters", name)
