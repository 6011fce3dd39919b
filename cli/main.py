"""The `restune-sd` Typer app: each command lives in its own module and is registered here."""

import typer

from restune_sd.cli.classify import app as classify_app
from restune_sd.cli.demo import demo
from restune_sd.cli.export import export
from restune_sd.cli.info import info
from restune_sd.cli.init_tiny import init_tiny
from restune_sd.cli.sample import sample
from restune_sd.cli.train import train
from restune_sd.cli.pending import PENDING, pending_command

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
app.command("export")(export)
app.command("demo", hidden=True)(demo)
app.add_typer(classify_app, name="classify")
for _name, _what in PENDING.items():
    app.command(_name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(pending_command(_name, _what))
from restune_sd.cli.fid import fid
app.command("fid")(fid)
from restune_sd.cli.bench import bench
app.command("bench")(bench)

if __name__ == "__main__":  # `accelerate launch -m restune_sd.cli.main train ...`
    app()
