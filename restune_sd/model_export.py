"""A UNet tuned whole (`full`), or a LoRA merged into the frozen weights it adapts, written as the standard files other
tools load: a diffusers UNet folder (`--format diffusers-unet`), or an original-layout SD v1.x single file holding the
base pipeline's VAE and text encoder beside the tuned UNet (`--format single-file`). The pipeline-folder format
(export.export_pipeline) shares the base pipeline's checks, the tuned UNet and the folder writing kept here."""

import json
import os
import shutil
from pathlib import Path

from restune_sd.errors import UserError
from restune_sd.files import staging_folder, warn, write_atomic, writing
from restune_sd.io import find_tuner_dir, is_plain_unet_lora, read_tuner_config, read_weights

HINT = "choose an --output where you can write"


def is_full_unet(meta: dict) -> bool:
    """Whether a tuner (its saved config) is a UNet tuned whole and nothing else."""
    tuning = meta["tuning"]
    return (meta["backbone"]["kind"] == "unet" and bool(tuning.get("full")) and not tuning.get("tuners")
            and not tuning.get("lora") and not tuning.get("bypass"))


def standard_tuner(tuner, fmt: str) -> tuple[Path, dict]:
    """The tuner folder at `tuner` and its config, if it has a standard model form: a `full` UNet, or a UNet LoRA."""
    folder = find_tuner_dir(tuner)
    meta = read_tuner_config(folder)
    if not (is_full_unet(meta) or is_plain_unet_lora(meta)):
        kind = f"{meta['tuning'].get('name', 'custom')!r} {meta['backbone']['kind']}"
        other = " (a classifier tuned whole: --format vit-folder)" if meta["backbone"]["kind"] == "vit" else ""
        raise UserError(f"tuner {folder} ({kind} tuner) adds modules no standard model has: only a UNet tuned whole "
                        f"(`full`) or a UNet LoRA (merged) exports as --format {fmt}{other}; use it with "
                        f"`restune-sd sample --tuner {tuner}` or restune_sd.load_tuner")
    if "text_encoder_lora" in meta and fmt != "single-file":
        raise UserError(f"tuner {folder} also holds a text-encoder LoRA, which --format {fmt} would leave out: use "
                        "--format single-file (both merged), or sample it with `restune-sd sample --tuner`")
    return folder, meta


def base_pipeline(folder: Path, model: str | None, output: Path) -> Path:
    """The local pipeline folder the tuner was trained on (`model`, or the one its run's config.json names), checked
    whole; `output` may not be it, lie in it nor hold it."""
    from restune_sd.export import run_model
    from restune_sd.models import check_pipeline

    model = Path(model or run_model(folder))
    if not (model / "model_index.json").is_file():
        raise UserError(f"--model {model} is not a local diffusers pipeline folder (model_index.json): export copies "
                        "its parts, so pass the folder the tuner was trained on")
    target, base = output.resolve(), model.resolve()
    if target == base or base in target.parents or target in base.parents:
        raise UserError(f"--output {output} is the pipeline folder export reads, lies in it or holds it: choose an "
                        "--output outside it")
    check_pipeline(str(model))
    return model


def load_full_weights(folder: Path, meta: dict, unet, model: Path) -> None:
    """A `full` tuner's weights into `unet`, the base pipeline's, once its architecture is checked to be the tuner's."""
    from restune_sd.io import read_fitting_tuner

    read_fitting_tuner(folder, unet)
    missing, unexpected = unet.load_state_dict(read_weights(folder, meta), strict=False)
    if missing or unexpected:
        raise UserError(f"tuner {folder} does not fit {model}'s UNet: {len(missing)} missing and {len(unexpected)} "
                        f"unexpected weights (e.g. {(missing or unexpected)[0]})")


def tuned_unet(folder: Path, meta: dict, model: Path):
    """The base pipeline's UNet with the tuner in its weights, as a plain UNet2DConditionModel."""
    from restune_sd.export import merge_lora
    from restune_sd.io import load_tuner
    from restune_sd.models import load_unet

    unet = load_unet(str(model))
    if is_plain_unet_lora(meta):
        return merge_lora(load_tuner(unet, folder))
    load_full_weights(folder, meta, unet, model)
    return unet


def tuned_pipeline(folder: Path, meta: dict, model: Path):
    """The base pipeline with the tuner in its weights: a LoRA (and a text-encoder LoRA beside it) merged."""
    from diffusers import StableDiffusionPipeline

    from restune_sd.export import merge_lora
    from restune_sd.io import load_tuner
    from restune_sd.models import quiet_loading

    quiet_loading()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    if is_plain_unet_lora(meta):
        return merge_lora(load_tuner(pipe, folder))
    load_full_weights(folder, meta, pipe.unet, model)
    return pipe


def write_model_folder(output: Path, fill) -> None:
    """`fill(folder)` fills a new hidden sibling of `output`, which then replaces `output` (made with its parents);
    on failure nothing is left behind."""
    from restune_sd.export import new_folder

    with new_folder(output.parent, HINT), writing(output, HINT):
        staging = staging_folder(output)
        try:
            fill(staging)
            if output.exists():
                shutil.rmtree(output)
            os.replace(staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def sampling_notes(meta: dict, model: Path) -> dict:
    """What the tuner was trained with that a bare UNet or a single file does not carry (restune-sd's sample reads it
    from the tuner), as the diffusers settings to load it with; one warning line when there is any."""
    notes = {}
    scheduler = model / "scheduler" / "scheduler_config.json"
    base = json.loads(scheduler.read_text()).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    if meta.get("prediction_type") in ("epsilon", "v_prediction") and meta["prediction_type"] != base:
        notes["prediction_type"] = meta["prediction_type"]
    if meta.get("zero_terminal_snr"):
        notes |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    if meta.get("clip_skip"):
        notes["clip_skip"] = meta["clip_skip"]
    if notes:
        warn("the exported model does not carry what the tuner was trained with: load it with "
             + ", ".join(f"{k}={v}" for k, v in notes.items()) + " (the scheduler's settings, and the pipeline call's clip_skip)")
    return notes


def export_unet_folder(tuner, output, model: str | None = None, overwrite: bool = False) -> dict:
    """Write a UNet tuned whole (`full`), or the base UNet with a LoRA tuner merged into it, as a diffusers UNet folder
    at `output`, which `UNet2DConditionModel.from_pretrained(output)` loads.

    `model` is the local pipeline folder the tuner was trained on (default: the one its run's config.json names)."""
    from restune_sd.export import refuse_own_input, refuse_taken_output

    folder, meta = standard_tuner(tuner, "diffusers-unet")
    output = Path(output)
    refuse_own_input(output, folder)
    model = base_pipeline(folder, model, output)
    refuse_taken_output(output, overwrite, "config.json")
    unet = tuned_unet(folder, meta, model)
    write_model_folder(output, lambda staging: unet.save_pretrained(staging, safe_serialization=True))
    return {"folder": str(output), "format": "diffusers-unet", "model": str(model), "tuner": str(folder),
            "merged_lora": is_plain_unet_lora(meta), "unet_params": sum(p.numel() for p in unet.parameters()),
            **({"load_with": notes} if (notes := sampling_notes(meta, model)) else {})}


def export_single_file(tuner, output, model: str | None = None, overwrite: bool = False) -> dict:
    """Write the base pipeline with a UNet tuned whole (`full`) or a LoRA tuner merged into it as one original-layout
    (LDM) SD v1.x `.safetensors` at `output`: its UNet, VAE and text encoder, which A1111, ComfyUI and
    `StableDiffusionPipeline.from_single_file(output, config=MODEL)` load.

    `model` is the local pipeline folder the tuner was trained on (default: the one its run's config.json names)."""
    from safetensors.torch import save_file

    from restune_sd.export import export_output, new_folder, refuse_own_input
    from restune_sd.kohya_metadata import base_model_version
    from restune_sd.original_layout import original_layout

    folder, meta = standard_tuner(tuner, "single-file")
    version = base_model_version(meta["backbone"]["signature"], meta.get("prediction_type"))
    if not version.startswith("sd_v1"):
        raise UserError(f"tuner {folder} tunes a UNet shaped as {version}, and --format single-file writes the SD v1.x "
                        "layout: use --format diffusers-unet or pipeline")
    path = export_output(output, "single-file")
    refuse_own_input(path, folder)
    model = base_pipeline(folder, model, path)
    if path.is_dir():
        raise UserError(f"--output {path} is a folder: --format single-file writes one .safetensors file")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: choose another --output, or pass --overwrite to replace it")
    pipe = tuned_pipeline(folder, meta, model)
    state = original_layout(pipe.unet, pipe.vae, pipe.text_encoder)
    with new_folder(path.parent, HINT), writing(path, HINT):
        write_atomic(path, lambda tmp: save_file(state, str(tmp), {"format": "pt"}), HINT)
    return {"file": str(path), "format": "single-file", "model": str(model), "tuner": str(folder),
            "merged_lora": is_plain_unet_lora(meta), "tensors": len(state),
            **({"load_with": notes} if (notes := sampling_notes(meta, model)) else {})}
