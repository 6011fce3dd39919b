"""Commands whose issues are still open: each says so plainly and exits non-zero."""

import typer


def pending_command(command: str, what: str):
    def run(args: list[str] | None = typer.Argument(None, hidden=True)):
        typer.echo(f"error: `restune-sd {command}` ({what}) is not built yet; it is tracked as an open issue", err=True)
        raise typer.Exit(2)

    run.__doc__ = f"{what[0].upper()}{what[1:]} (not built yet)."
    return run


PENDING: dict[str, str] = {}
