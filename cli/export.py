"""`restune-sd export`: a LoRA tuner as a file other tools load (kohya/A1111/ComfyUI keys, or diffusers'); a classifier
tuned whole as a transformers ViT folder; a UNet tuned whole (or with a LoRA merged) as a diffusers pipeline or UNet
folder or an SD v1.x single file."""

import json
from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors
from restune_sd.errors import UserError


@user_errors
def export(
    tuner: Annotated[str, typer.Argument(help="LoRA tuner folder or run directory (vit-folder: a full or linear classify run; "
                                          "pipeline: a full train run; diffusers-unet, single-file: a full or LoRA train run)")],
    output: Annotated[Path, typer.Option(help="the .safetensors file to write (diffusers: or a folder, made if new; "
                                              "vit-folder, pipeline, diffusers-unet: a new folder), outside the tuner folder")],
    format: Annotated[str, typer.Option("--format", help="kohya (A1111, ComfyUI, sd-scripts), diffusers, vit-folder "
                                                         "(a transformers ViT model folder), pipeline (a diffusers SD "
                                                         "pipeline folder), diffusers-unet (a diffusers UNet folder) or "
                                                         "single-file (an original-layout SD v1.x .safetensors); the "
                                                         "last two take a LoRA merged into the weights too")] = "kohya",
    model: Annotated[str | None, typer.Option(help="vit-folder, pipeline, diffusers-unet, single-file: the model the "
                                                   "tuner was trained on (default: the run's own)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
):
    """Write a LoRA tuner in another tool's format, or a model tuned whole (classifier or UNet) or with its LoRA merged
    as a standard model; other tuner kinds load with restune_sd.load_tuner."""
    from restune_sd.export import MODEL_FORMATS, export_lora, export_pipeline, export_vit_folder
    from restune_sd.model_export import export_single_file, export_unet_folder

    writers = {"vit-folder": export_vit_folder, "pipeline": export_pipeline, "diffusers-unet": export_unet_folder,
               "single-file": export_single_file}
    if format in MODEL_FORMATS:
        result = writers[format](tuner, output, model, overwrite)
    else:
        if model is not None:
            raise UserError(f"--model goes with --format {', '.join(MODEL_FORMATS)} only")
        result = export_lora(tuner, format, output, overwrite)
    typer.echo(json.dumps(result, indent=2))
