"""`restune-sd export`: a LoRA tuner as a file other tools load (kohya/A1111/ComfyUI keys, or diffusers'); a classifier
tuned whole as a transformers ViT folder; a UNet tuned whole as a diffusers pipeline folder."""

import json
from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors
from restune_sd.errors import UserError


@user_errors
def export(
    tuner: Annotated[str, typer.Argument(help="LoRA tuner folder or run directory (vit-folder: a full or linear classify run; "
                                          "pipeline: a full train run)")],
    output: Annotated[Path, typer.Option(help="the .safetensors file to write (diffusers: or a folder, made if new; "
                                              "vit-folder, pipeline: a new folder), outside the tuner folder")],
    format: Annotated[str, typer.Option("--format", help="kohya (A1111, ComfyUI, sd-scripts), diffusers, vit-folder "
                                                         "(a transformers ViT model folder) or pipeline (a diffusers SD "
                                                         "pipeline folder)")] = "kohya",
    model: Annotated[str | None, typer.Option(help="vit-folder, pipeline: the model the tuner was trained on (default: the run's own)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
):
    """Write a LoRA tuner in another tool's format, or a model tuned whole (classifier or UNet) as a model folder; other
    tuner kinds load with restune_sd.load_tuner."""
    from restune_sd.export import MODEL_FOLDERS, export_lora, export_pipeline, export_vit_folder

    if format in MODEL_FOLDERS:
        result = (export_vit_folder if format == "vit-folder" else export_pipeline)(tuner, output, model, overwrite)
    else:
        if model is not None:
            raise UserError("--model goes with --format vit-folder or pipeline only")
        result = export_lora(tuner, format, output, overwrite)
    typer.echo(json.dumps(result, indent=2))
