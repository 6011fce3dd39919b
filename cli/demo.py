"""`restune-sd demo` (hidden): the offline end-to-end demo that `make demo` runs."""

from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors


@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="new folder for everything the demo writes")] = Path("demo-out"),
    steps: Annotated[int, typer.Option(help="training steps per tuner")] = 60,
    images: Annotated[int, typer.Option(help="images sampled per tuner")] = 16,
):
    """Tiny model -> train Res-Tuning, Bypass and LoRA -> sample -> FID -> a summary table (offline, CPU)."""
    from restune_sd.evaluation.demo import run_demo

    run_demo(out, steps, images)
