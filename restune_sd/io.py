"""Saving a trained tuner as a folder (config JSON + safetensors) and attaching it to a fresh backbone.

A tuner folder holds `tuner_config.json` and `tuner.safetensors` (tuner weights only, plus the head for
classifiers). It is written to a temporary sibling and renamed into place, so it is never half-written; the
config records the weights' SHA-256, so a damaged or altered copy is refused when loaded.
"""

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save_file
from torch import nn

from restune_sd.attention import guard_processors
from restune_sd.config import TuningConfig
from restune_sd.errors import UserError
from restune_sd.files import read_bytes, read_text, readable_file, staging_folder, warn
from restune_sd.inject import attach, backbone_kind, unwrap
from restune_sd.schema import (CHECKSUM_FIELD, FORMAT, FORMAT_1, SIGNATURE_KEYS, check_tuner_config,
                               config_checksum)
from restune_sd.text_encoder_lora import (TEXT_ENCODER_LORA_FILE, diffusers_layers, diffusers_metadata,
                                          load_text_encoder_lora, write_text_encoder_lora)

CONFIG_FILE = "tuner_config.json"
WEIGHTS_FILE = "tuner.safetensors"
# The LoRA of a plain LoRA tuner, also in diffusers' own format and file name (what `load_lora_weights(folder)` reads).
LORA_FILE = "pytorch_lora_weights.safetensors"
# Run directories (see `restune-sd train`) keep the final tuner in this sub-folder.
RUN_TUNER_DIR = "tuner"
# Far above any tuner's config (100,000 class names of 100 characters are 12 MB), far below what exhausts memory.
MAX_CONFIG_BYTES = 32 * 2**20


def backbone_signature(model) -> dict:
    """The shape-defining config fields a tuner depends on."""
    keys = SIGNATURE_KEYS[backbone_kind(model)]
    config = model.config
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k in keys for v in [getattr(config, k, None)]}


def tuner_state(model) -> dict[str, torch.Tensor]:
    tuned = model.restune
    params = dict(model.named_parameters())
    return {name: params[name].detach().contiguous().cpu() for name in tuned.param_names + tuned.head_names}


def save_tuner(model, path, extra: dict | None = None) -> Path:
    """Write the tuner attached to `model` into the new folder `path` (which must not hold files)."""
    model = unwrap(model)
    if getattr(model, "restune", None) is None:
        raise UserError("this model carries no restune tuner: attach one with restune_sd.attach or load_tuner first")
    if model.restune.stack:
        raise UserError("this model carries a stack of tuners, which is no one tuner to save: save each tuner on its own")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already holds files: choose a new folder (nothing is overwritten)")
    if backbone_kind(model) == "unet":
        guard_processors(model)
    state = tuner_state(model)
    meta = {
        "format": FORMAT,
        "backbone": {"kind": model.restune.backbone, "class": plain_class(model).__name__, "signature": backbone_signature(model)},
        "tuning": model.restune.config.to_dict(),
        "tuner_params": sum(state[n].numel() for n in model.restune.param_names),
        **(extra or {}),
    }
    if model.restune.head_names:
        meta["head"] = {"num_labels": model.config.num_labels, "id2label": {str(k): v for k, v in model.config.id2label.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(path)
    try:
        save_file(state, str(staging / WEIGHTS_FILE))
        if model.restune.text_encoder_lora:
            meta["text_encoder_lora"] = write_text_encoder_lora(model.restune.text_encoder_lora, staging)
        if is_plain_unet_lora(meta):
            write_diffusers_lora(state, model.restune.config.lora, staging, *text_encoder_part(staging, meta))
        meta["weights_sha256"] = hashlib.sha256((staging / WEIGHTS_FILE).read_bytes()).hexdigest()
        meta[CHECKSUM_FIELD] = config_checksum(meta)
        check_tuner_config(json.loads(json.dumps(meta)), path)  # what load_tuner will accept: a wrong extra fails here
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def is_plain_unet_lora(meta: dict) -> bool:
    """Whether a tuner (its saved config) is a UNet LoRA and nothing else: what LoRA files of other tools can hold."""
    tuning = meta["tuning"]
    return (meta["backbone"]["kind"] == "unet" and bool(tuning.get("lora")) and not tuning.get("tuners")
            and not tuning.get("bypass") and not tuning.get("full"))


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA tuner's tensors as module path -> (down, up), i.e. PEFT's (lora_A, lora_B)."""
    down = ".lora_A.default.weight"
    return {name.removesuffix(down): (tensor, state[name.replace(".lora_A.", ".lora_B.")])
            for name, tensor in state.items() if name.endswith(down)}


def write_diffusers_lora(state: dict[str, torch.Tensor], lora, folder: Path, text_encoder_state: dict | None = None,
                         text_encoder_record: dict | None = None) -> Path:
    """The LoRA also as diffusers writes it (`pytorch_lora_weights.safetensors`, its rank and alpha in the metadata), so
    a stock pipeline's `load_lora_weights(folder)` applies it with no other argument; a text-encoder LoRA
    (restune_sd.text_encoder_lora) goes in under `text_encoder.`, as `save_lora_weights` puts it."""
    from diffusers import StableDiffusionPipeline

    pairs = lora_pairs(state)
    layers = {f"{module}.lora.{part}.weight": tensor for module, (down, up) in pairs.items()
              for part, tensor in (("down", down), ("up", up))}
    metadata = {"r": lora.rank, "lora_alpha": lora.alpha or lora.rank, "target_modules": sorted(pairs)}
    text_encoder = {} if text_encoder_state is None else {
        "text_encoder_lora_layers": diffusers_layers(lora_pairs(text_encoder_state)),
        "text_encoder_lora_adapter_metadata": diffusers_metadata(text_encoder_record)}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True, weight_name=LORA_FILE, **text_encoder)
    return folder / LORA_FILE


def text_encoder_part(folder: Path, meta: dict) -> tuple[dict, dict] | tuple[()]:
    """A tuner's text-encoder LoRA as (its tensors, its record), or () for a tuner without one."""
    record = meta.get("text_encoder_lora")
    if record is None:
        return ()
    return read_safetensors(folder / TEXT_ENCODER_LORA_FILE, record["weights_sha256"]), record


def find_tuner_dir(path) -> Path:
    """A tuner folder, or a training run directory holding one in `tuner/`."""
    path = Path(path)
    for candidate in (path, path / RUN_TUNER_DIR):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise UserError(f"{path} is not a tuner folder or a run directory: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it or in {path / RUN_TUNER_DIR}")


def read_tuner_config(path) -> dict:
    """A tuner's config, checked whole against its schema and checksum (restune_sd.schema)."""
    config = readable_file(find_tuner_dir(path) / CONFIG_FILE, "tuner config", "copy the tuner folder again")
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"tuner config {config} is {config.stat().st_size:,} bytes, more than any tuner's: copy the "
                        "tuner folder again")
    try:
        meta = json.loads(read_text(config, "tuner config", "copy the tuner folder again"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"tuner config {config} is damaged ({str(error).splitlines()[0]}): copy the tuner folder again") from None
    except RecursionError:
        raise UserError(f"tuner config {config} is nested too deeply to be a tuner's: copy the tuner folder again") from None
    return check_tuner_config(meta, config)


def tuner_digest(path) -> str:
    """The SHA-256 of a tuner's config and weights together: what identifies a tuner, whatever its folder's name. Both
    are checked first (schema, checksums), so a command that records the digest refuses a damaged tuner before writing."""
    folder = find_tuner_dir(path)
    meta = read_tuner_config(folder)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        data = (folder / name).read_bytes()
        if name == WEIGHTS_FILE:
            check_weights_checksum(folder / name, data, meta)
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def check_weights_checksum(path: Path, data: bytes, meta: dict) -> None:
    expected = meta.get("weights_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise UserError(f"tuner {path} is damaged: it does not match the checksum in its {CONFIG_FILE}; copy the tuner again")


def read_weights(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The tuner's tensors, checked against the checksum in its config; a damaged file is a UserError naming it."""
    return read_safetensors(folder / WEIGHTS_FILE, meta.get("weights_sha256"))


def read_safetensors(path: Path, expected: str | None) -> dict[str, torch.Tensor]:
    """A tuner folder's tensor file, checked against its `expected` SHA-256; a missing, damaged or non-finite file is a
    UserError naming it."""
    data = read_bytes(path, "tuner weights", "copy the tuner folder again")
    check_weights_checksum(path, data, {"weights_sha256": expected})
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, OSError) as error:
        raise UserError(f"tuner {path} is damaged ({str(error).splitlines()[0]}); copy the tuner again") from None
    broken = next((name for name, tensor in state.items() if not torch.isfinite(tensor).all()), None)
    if broken is not None:
        raise UserError(f"tuner {path} holds non-finite weights (first: {broken}): it cannot give sensible images")
    return state


def _resize_head(model, head: dict) -> None:
    num_labels = head["num_labels"]
    if model.classifier.out_features != num_labels:
        model.classifier = nn.Linear(model.classifier.in_features, num_labels).to(model.classifier.weight.device)
    model.config.num_labels = num_labels
    model.config.id2label = {int(k): v for k, v in head["id2label"].items()}
    model.config.label2id = {v: int(k) for k, v in head["id2label"].items()}


def read_fitting_tuner(path, backbone) -> tuple[Path, dict]:
    """The tuner folder at `path` and its config, checked to fit `backbone` (its kind and shape-defining config)."""
    folder = find_tuner_dir(path)
    meta = read_tuner_config(folder)
    kind = backbone_kind(backbone)
    saved = meta["backbone"]
    if saved["kind"] != kind:
        raise UserError(f"tuner {folder} was trained for a {saved['kind']}, not a {kind}: load it into a {saved['kind']}")
    here = backbone_signature(backbone)
    differ = [k for k, v in saved["signature"].items() if here.get(k) != v]
    if differ:
        k = differ[0]
        raise UserError(f"tuner {folder} does not fit this {kind}: it was trained with {k}={saved['signature'][k]}, this model has {k}={here.get(k)}")
    return folder, meta


class TunedBackbone:
    """The class load_tuner gives a backbone and a pipeline holding it (their own class behind this one): their
    `save_pretrained` would write the tuner under wrapped keys that `from_pretrained` ignores (a LoRA's also move the
    frozen weights), so it refuses, before a pipeline writes any part."""

    def save_pretrained(self, *args, **kwargs):
        lora = "; or, for a LoRA, restune-sd export or restune_sd.export.merge_lora(model) first" if unwrap(self).restune.config.lora else ""
        raise UserError(f"this {plain_class(self).__name__} carries a restune-sd tuner that save_pretrained would drop "
                        f"(from_pretrained ignores its keys): keep it with restune_sd.save_tuner(model, DIR) and "
                        f"restune_sd.load_tuner{lora}")


@functools.cache
def tuned_class(cls: type) -> type:
    return type(f"Tuned{cls.__name__}", (TunedBackbone, cls), {"__module__": __name__, "plain_class": cls})


def mark_tuned(model) -> None:
    if not isinstance(model, TunedBackbone):
        model.__class__ = tuned_class(type(model))


def plain_class(model) -> type:
    """The backbone's own class, behind load_tuner's TunedBackbone."""
    return getattr(model, "plain_class", type(model))


def load_tuner(model, path):
    """Attach the saved tuner at `path` (a tuner folder or a run directory) to a plain backbone and return it.

    `model` is a diffusers UNet2DConditionModel, a Stable Diffusion pipeline (its UNet is tuned in place and the
    pipeline returned) or a transformers ViTForImageClassification.
    """
    backbone = unwrap(model)
    folder, meta = read_fitting_tuner(path, backbone)
    if "head" in meta:
        _resize_head(backbone, meta["head"])
    state = read_tuner_weights(folder, meta)
    attach(backbone, TuningConfig.from_dict(meta["tuning"]))
    copy_weights(backbone, folder, meta, state, set(backbone.restune.param_names + backbone.restune.head_names))
    if "text_encoder_lora" in meta:
        if getattr(model, "text_encoder", None) is None:
            warn(f"tuner {folder} also holds a LoRA for the text encoder, which applies to a pipeline only: load it into "
                 "a Stable Diffusion pipeline to use it")
        else:
            backbone.restune.text_encoder_lora = load_text_encoder_lora(model, folder, meta["text_encoder_lora"])
    mark_tuned(backbone)
    mark_tuned(model)
    return model


def read_tuner_weights(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    """A tuner's checked tensors; a bypass of restune-sd 0.1 is refused (its weights mean another ladder)."""
    state = read_weights(folder, meta)
    if meta["format"] == FORMAT_1 and meta["tuning"].get("bypass"):
        raise UserError(f"tuner {folder} is a bypass saved by restune-sd 0.1, whose ladder passed nothing between its "
                        "stages; this version's ladder is another function of those weights: train the tuner again")
    return state


def copy_weights(backbone, folder: Path, meta: dict, state: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Copy a tuner's tensors (named as `backbone` names them) into the parameters `expected` names, which they must
    match one for one and shape for shape."""
    kind = backbone_kind(backbone)
    params = dict(backbone.named_parameters())
    if meta["format"] == FORMAT_1:
        state = {name: tensor for name, tensor in state.items() if name in expected or not name.endswith(".scale")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"tuner {folder} does not fit this {kind}: {len(missing)} missing and {len(unexpected)} unexpected weights (e.g. {(missing or unexpected)[0]})")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"tuner {folder} does not fit this {kind}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
