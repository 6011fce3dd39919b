"""The `restune-sd` command line (Typer); `restune_sd.cli.main:app` is the entry point."""
