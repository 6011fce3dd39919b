"""Shared pieces of the Typer commands: the error guard that turns a UserError into one line and exit 2."""

import functools
from typing import Annotated

import typer

from restune_sd.errors import UserError

# Options that `train` and `classify train` share, declared once.
ReportTo = Annotated[str, typer.Option(help="where loss, lr and validation go: tensorboard (RUN_DIR/tensorboard), wandb, "
                                            "all (both) or none")]
LrScheduler = Annotated[str, typer.Option(help="diffusers' schedules: constant, constant_with_warmup, linear, cosine, "
                                              "cosine_with_restarts, polynomial or piecewise_constant")]
LrNumCycles = Annotated[int, typer.Option(help="cosine_with_restarts: number of hard restarts")]
LrPower = Annotated[float, typer.Option(help="polynomial: the decay's power")]
LrStepRules = Annotated[str | None, typer.Option(help="piecewise_constant: FACTOR:STEP,...,FACTOR, e.g. 1:1000,0.1:2000,0.01")]
TensorBoardFlag = Annotated[bool, typer.Option(help="deprecated: the same as --report-to tensorboard, now the default")]


def user_errors(command):
    """Run a command so that bad input prints `error: ...` on one line and exits 2, never a traceback."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return guarded
