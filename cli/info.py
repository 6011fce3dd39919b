"""`restune-sd info`: trainable and total parameters of a tuner on a backbone, with a per-module breakdown."""

import json
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors


@user_errors
def info(
    model: Annotated[str, typer.Option(help="model folder (SD pipeline, UNet or ViT), or sd15 / vit-b16 for the real architecture with random weights")],
    tuner: Annotated[str, typer.Option(help="preset name (res-tuning, bypass, adapter, prefix, prompt, lora, full; vit: linear) or a YAML/JSON config")] = "res-tuning",
    config: Annotated[str | None, typer.Option(help="a YAML/JSON tuner config (overrides --tuner)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    modules: Annotated[int, typer.Option(help="how many per-module rows to print (0: all)")] = 12,
):
    """Count tuner, trainable and total parameters of TUNER on MODEL."""
    from restune_sd.config import resolve_tuner
    from restune_sd.inject import attach
    from restune_sd.models import ARCHITECTURES, build_architecture, model_kind, load_unet, load_vit
    from restune_sd.errors import UserError
    from restune_sd.summary import parameter_summary

    if modules < 0:
        raise UserError(f"--modules must be 0 (all) or a positive count, not {modules}")
    if model in ARCHITECTURES:
        backbone = build_architecture(model, device="meta")
    elif model_kind(model) == "vit":
        backbone = load_vit(model)
    else:
        backbone = load_unet(model)
    kind = "vit" if type(backbone).__name__.startswith("ViT") else "unet"
    attach(backbone, resolve_tuner(config or tuner, kind))
    summary = parameter_summary(backbone)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    pct = 100 * summary["tuner_params"] / summary["total_params"]
    typer.echo(f"tuner {summary['tuner']} on {model} ({kind})")
    typer.echo(f"  tuner params      {summary['tuner_params']:>14,}  ({pct:.3f}% of total)")
    if summary["head_params"]:
        typer.echo(f"  head params       {summary['head_params']:>14,}")
    typer.echo(f"  trainable params  {summary['trainable_params']:>14,}")
    typer.echo(f"  total params      {summary['total_params']:>14,}")
    rows = summary["modules"] if modules == 0 else summary["modules"][:modules]
    for row in rows:
        typer.echo(f"    {row['params']:>12,}  {row['module']}")
    if len(rows) < len(summary["modules"]):
        typer.echo(f"    ... {len(summary['modules']) - len(rows)} more modules (--modules 0 lists all)")
