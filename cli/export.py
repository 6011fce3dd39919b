"""`restune-sd export`: a LoRA tuner as a file other tools load (kohya/A1111/ComfyUI keys, or diffusers')."""

import json
from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors


@user_errors
def export(
    tuner: Annotated[str, typer.Argument(help="LoRA tuner folder or run directory")],
    output: Annotated[Path, typer.Option(help="the .safetensors file to write (diffusers: or a folder, made if new), "
                                              "outside the tuner folder")],
    format: Annotated[str, typer.Option("--format", help="kohya (A1111, ComfyUI, sd-scripts) or diffusers")] = "kohya",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output file")] = False,
):
    """Write a LoRA tuner in another tool's format; other tuner kinds load with restune_sd.load_tuner."""
    from restune_sd.export import export_lora

    typer.echo(json.dumps(export_lora(tuner, format, output, overwrite), indent=2))
