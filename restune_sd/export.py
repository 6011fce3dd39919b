"""LoRA tuners as the files other tools read: diffusers' `pytorch_lora_weights.safetensors` and kohya's key format
(sd-scripts, A1111, ComfyUI), or merged into the frozen weights; a fully tuned ViT classifier (`full`, `linear`) as a
transformers model folder, and a fully tuned UNet (`full`) inside a copy of its diffusers pipeline folder (as a bare
UNet folder or an SD v1.x single file, a LoRA merged too: model_export.py). Other tuner kinds have no foreign format."""

import json
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors.torch import save_file

from restune_sd.errors import UserError
from restune_sd.files import staging_folder, write_atomic, writing
from restune_sd.config import TuningConfig
from restune_sd.inject import unwrap
from restune_sd.io import (CONFIG_FILE, LORA_FILE, WEIGHTS_FILE, find_tuner_dir, is_plain_unet_lora, lora_pairs,
                           plain_class, read_tuner_config, read_weights, text_encoder_part, write_diffusers_lora)
from restune_sd.kohya_metadata import kohya_metadata, with_hashes
from restune_sd.text_encoder_lora import kohya_modules

FORMATS = ("kohya", "diffusers", "vit-folder", "pipeline", "diffusers-unet", "single-file")
MODEL_FORMATS = ("vit-folder", "pipeline", "diffusers-unet", "single-file")  # a whole model, not a LoRA file


def kohya_state(pairs: dict, alpha: float, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """kohya's keys: `lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight` and `.alpha` (the text
    encoder's: `lora_te_<its path in transformers 4, text_model.encoder...>`).

    Their readers scale by alpha / rank, as PEFT does by lora_alpha / r, so the saved alpha is ours."""
    state = {}
    for module, (down, up) in pairs.items():
        name = prefix + module.replace(".", "_")
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                  f"{name}.alpha": torch.tensor(float(alpha), dtype=down.dtype)}
    return state


def export_output(output, fmt: str) -> Path:
    """The file to write: `output` itself, or for diffusers `pytorch_lora_weights.safetensors` in the folder `output`
    (an existing folder, or a new path not ending in .safetensors, made when written)."""
    output = Path(output)
    if fmt == "diffusers" and (output.is_dir() or (output.suffix != ".safetensors" and not output.exists())):
        return output / LORA_FILE
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output} must end in .safetensors" + (" (or be a folder)" if fmt == "diffusers" else ""))
    return output


def refuse_own_input(path: Path, folder: Path) -> None:
    """`path` must lie outside the tuner folder being read, not hold it (a model folder replaced with --overwrite is
    removed whole) and be none of its files, also through links."""
    target, source = path.resolve(), folder.resolve()
    inputs = [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
    if (target == source or source in target.parents or target in source.parents
            or any(target == read.resolve() for read in inputs)
            or (path.exists() and any(os.path.samefile(path, read) for read in inputs))):
        raise UserError(f"--output {path} lies in the tuner folder {folder} that export reads, holds it, or is one of "
                        "its files: choose an --output outside it")


@contextmanager
def new_folder(folder: Path, hint: str):
    """`folder` made with any missing parents; if the body fails, the folders made here are removed again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    with writing(folder, hint):
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for made in missing:
            with suppress(OSError):
                made.rmdir()
        raise


def export_lora(tuner, fmt: str, output, overwrite: bool = False) -> dict:
    """Write the LoRA tuner at `tuner` (a tuner folder or run directory) as a `fmt` file at `output`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt in MODEL_FORMATS:
        raise UserError(f"--format {fmt} writes a whole model: call export_vit_folder, export_pipeline, or "
                        "restune_sd.model_export's export_unet_folder or export_single_file")
    folder = find_tuner_dir(tuner)
    meta = read_tuner_config(folder)
    if not is_plain_unet_lora(meta):
        kind = f"{meta['tuning'].get('name', 'custom')!r} {meta['backbone']['kind']}"
        alone = " (its text-encoder LoRA alone would leave its UNet tuner out)" if "text_encoder_lora" in meta else ""
        raise UserError(f"tuner {folder} ({kind} tuner) has no foreign format, only UNet LoRA tuners do{alone}: use it "
                        f"with `restune-sd sample --tuner {tuner}` or restune_sd.load_tuner")
    path = export_output(output, fmt)
    refuse_own_input(path, folder)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: choose another --output, or pass --overwrite to replace it")
    lora = TuningConfig.from_dict(meta["tuning"]).lora
    alpha = lora.alpha or lora.rank
    state = read_weights(folder, meta)
    pairs = lora_pairs(state)
    text_encoder = text_encoder_part(folder, meta)  # (its tensors, its record), or ()
    text_pairs = kohya_modules(lora_pairs(text_encoder[0])) if text_encoder else {}
    hint = "choose an --output where you can write"
    with new_folder(path.parent, hint), writing(path, hint):
        if fmt == "kohya":
            keys = kohya_state(pairs, alpha)
            if text_encoder:
                keys |= kohya_state(text_pairs, text_encoder[1]["alpha"], "lora_te_")
            metadata = with_hashes(keys, kohya_metadata(folder, meta, lora.rank, alpha, path))
            write_atomic(path, lambda tmp: save_file(keys, str(tmp), metadata), hint)
        else:
            write_diffusers_file(state, lora, path, *text_encoder)
    return {"file": str(path), "format": fmt, "lora_modules": len(pairs), "rank": lora.rank, "alpha": alpha,
            **({"text_encoder_lora_modules": len(text_pairs), "text_encoder_rank": text_encoder[1]["rank"],
                "text_encoder_alpha": text_encoder[1]["alpha"]} if text_encoder else {})}


def write_diffusers_file(state: dict, lora, path: Path, *text_encoder) -> None:
    """diffusers writes into a folder: write into a temporary sibling folder, then rename the file into place."""
    staging = staging_folder(path)
    try:
        os.replace(write_diffusers_lora(state, lora, staging, *text_encoder), path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def merge_lora(model):
    """Fold a LoRA tuner into the frozen weights it adapts and remove it: `model` (a backbone or a pipeline holding
    one) is a plain model again, whose `save_pretrained` writes the merged weights; a text-encoder LoRA loaded with it
    is folded into the text encoder. Returns `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    backbone = unwrap(model)
    tuned = getattr(backbone, "restune", None)
    if tuned is None or not tuned.config.lora or tuned.config.tuners or tuned.config.full:
        raise UserError("merge_lora folds a LoRA tuner into the weights: this model carries "
                        + ("no restune-sd tuner" if tuned is None else "other tuners, which cannot be merged (keep them with save_tuner)"))
    with torch.no_grad():
        for tuned_module in (backbone, *([tuned.text_encoder_lora.module] if tuned.text_encoder_lora else [])):
            for name, layer in list(tuned_module.named_modules()):
                if isinstance(layer, BaseTunerLayer):
                    layer.merge()
                    parent, _, child = name.rpartition(".")
                    setattr(tuned_module.get_submodule(parent), child, layer.get_base_layer())
            del tuned_module.peft_config
    backbone.restune = None
    for plain in (model, backbone):
        plain.__class__ = plain_class(plain)
    return model


def run_model(folder: Path) -> str:
    """The --model a classify run was made with, from the run's config.json beside its tuner/ folder."""
    from restune_sd.files import read_json

    config = folder.parent / "config.json"
    model = read_json(config, "pass --model").get("model") if folder.name == "tuner" and config.is_file() else None
    if not isinstance(model, str):
        raise UserError(f"{folder} is not inside a run that names its model: pass --model, the model it was tuned from")
    return model


def export_vit_folder(tuner, output, model: str | None = None, overwrite: bool = False) -> dict:
    """Write a classifier tuned whole (`full`, or `linear`: the head alone) as a transformers ViT folder at `output`:
    config with the run's class names, safetensors weights and the preprocessor config it was trained with, so
    `ViTForImageClassification.from_pretrained(output)` and `restune-sd classify train --model OUTPUT` load it.

    `model` is the ViT the tuner was trained on (default: the one its run's config.json names)."""
    from transformers import ViTImageProcessor

    from restune_sd.classify import frozen_vit, trained_preprocessing
    from restune_sd.io import load_tuner
    from restune_sd.model_export import write_model_folder

    folder = find_tuner_dir(tuner)
    meta = read_tuner_config(folder)
    tuning = meta["tuning"]
    if meta["backbone"]["kind"] != "vit" or "head" not in meta or tuning.get("tuners") or tuning.get("lora") or tuning.get("bypass"):
        raise UserError(f"tuner {folder} ({tuning.get('name', 'custom')!r}) adds modules a plain ViT does not have: only "
                        "classifiers tuned with `full` or `linear` export as a ViT folder")
    model = model or run_model(folder)
    output = Path(output)
    refuse_own_input(output, folder)
    refuse_taken_output(output, overwrite, "config.json")
    vit = load_tuner(frozen_vit(model), folder).eval()
    prep = trained_preprocessing(model, folder)
    vit.restune = None
    vit.__class__ = plain_class(vit)  # a plain ViTForImageClassification: its save_pretrained writes every weight
    side = prep["resolution"]
    processor = ViTImageProcessor(size={"height": side, "width": side}, image_mean=list(prep["image_mean"]),
                                  image_std=list(prep["image_std"]))

    def fill(staging: Path) -> None:
        vit.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)

    write_model_folder(output, fill)
    return {"folder": str(output), "format": "vit-folder", "model": str(model), "tuner": str(folder),
            "num_labels": vit.config.num_labels, "resolution": side}


def refuse_taken_output(output: Path, overwrite: bool, marker: str) -> None:
    """A model folder is written only where nothing is, or, with `overwrite`, over a model folder (one holding `marker`)."""
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not (overwrite and (output / marker).is_file()):
            raise UserError(f"{output} already exists: choose a new --output folder, or pass --overwrite to replace a "
                            "model folder exported before")


def export_pipeline(tuner, output, model: str | None = None, overwrite: bool = False) -> dict:
    """Write a UNet tuned whole (`full`) into a copy of its diffusers pipeline folder at `output`: every other part is
    the base pipeline's, byte for byte, so `StableDiffusionPipeline.from_pretrained(output)` and `restune-sd train
    --model OUTPUT` load the tuned model. The scheduler predicts what the tuner was trained to predict.

    `model` is the local pipeline folder the tuner was trained on (default: the one its run's config.json names)."""
    from restune_sd.model_export import base_pipeline, is_full_unet, tuned_unet, write_model_folder

    folder = find_tuner_dir(tuner)
    meta = read_tuner_config(folder)
    tuning = meta["tuning"]
    if not is_full_unet(meta):
        raise UserError(f"tuner {folder} ({tuning.get('name', 'custom')!r} {meta['backbone']['kind']} tuner) is not a UNet "
                        "tuned whole: only `full` UNet tuners export as a pipeline folder (a LoRA: --format diffusers)")
    if "text_encoder_lora" in meta:
        raise UserError(f"tuner {folder} also holds a text-encoder LoRA, which a pipeline folder export would leave out: "
                        "sample it with `restune-sd sample --tuner`, which applies both")
    output = Path(output)
    refuse_own_input(output, folder)
    model = base_pipeline(folder, model, output)
    refuse_taken_output(output, overwrite, "model_index.json")
    unet = tuned_unet(folder, meta, model)

    def fill(staging: Path) -> None:
        for part in model.iterdir():
            if part.name != "unet" and not part.name.startswith("."):
                (shutil.copytree if part.is_dir() else shutil.copy2)(part, staging / part.name)
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        predicts = meta.get("prediction_type")
        if predicts in ("epsilon", "v_prediction") and (staging / "scheduler" / "scheduler_config.json").is_file():
            set_prediction_type(staging / "scheduler" / "scheduler_config.json", predicts)

    write_model_folder(output, fill)
    return {"folder": str(output), "format": "pipeline", "model": str(model), "tuner": str(folder),
            "unet_params": sum(p.numel() for p in unet.parameters()), "prediction_type": meta.get("prediction_type")}


def set_prediction_type(path: Path, prediction_type: str) -> None:
    config = json.loads(path.read_text())
    if config.get("prediction_type") != prediction_type:
        path.write_text(json.dumps({**config, "prediction_type": prediction_type}, indent=2) + "\n")
