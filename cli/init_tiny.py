"""`restune-sd init-tiny`: write a tiny random SD pipeline or ViT classifier for offline tests and demos."""

from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors


@user_errors
def init_tiny(
    directory: Annotated[Path, typer.Argument(help="new folder to write the model into")],
    kind: Annotated[str, typer.Option(help="sd (diffusers pipeline layout) or vit (transformers layout)")] = "sd",
    seed: Annotated[int, typer.Option(help="weights seed: same seed, same bytes")] = 0,
):
    """Write a tiny random model in the standard folder layout (loads with plain from_pretrained, offline)."""
    from restune_sd.errors import UserError
    from restune_sd.files import writing
    from restune_sd.tiny import write_tiny_sd, write_tiny_vit

    from restune_sd.bounds import MAX_SEED, require_number

    if kind not in ("sd", "vit"):
        raise UserError(f"unknown kind {kind!r}: use sd or vit")
    require_number("--seed", seed, minimum=0, maximum=MAX_SEED, integer=True)
    with writing(directory, "choose a folder where you can write"):
        path = write_tiny_sd(directory, seed=seed) if kind == "sd" else write_tiny_vit(directory, seed=seed)
    typer.echo(f"wrote a tiny {kind} model to {path}")
