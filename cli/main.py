"""The `restune-sd` Typer app: each command lives in its own module and is registered here."""

import typer

from restune_sd.cli.bench import bench
from restune_sd.cli.classify import app as classify_app
from restune_sd.cli.demo import demo
from restune_sd.cli.export import export
from restune_sd.cli.fid import fid
from restune_sd.cli.info import info
from restune_sd.cli.init_tiny import init_tiny
from restune_sd.cli.sample import sample
from restune_sd.cli.train import train

app = typer.Typer(
    name="restune-sd",
    help="Res-Tuning for Stable Diffusion and ViT: unbound tuners and the memory-efficient bypass.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("info")(info)
app.command("init-tiny")(init_tiny)
app.command("train")(train)
app.command("sample")(sample)
app.command("fid")(fid)
app.command("export")(export)
app.command("bench")(bench)
app.add_typer(classify_app, name="classify")
app.command("demo", hidden=True)(demo)

if __name__ == "__main__":  # `accelerate launch -m restune_sd.cli.main train ...`
    app()
