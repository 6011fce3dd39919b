"""`restune-sd bench sd|vit`: every tuner's parameters, peak memory, step time and sampling speed, side by side;
`restune-sd bench vit --task`: a whole VTAB-1K-sized task's wall time, bypass on cached taps against LoRA;
`restune-sd bench digits`: every tuner on real images (handwritten digits), both backbones."""

from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors


@user_errors
def bench(
    kind: Annotated[str, typer.Argument(help="sd (the UNet), vit (a ViT classifier), or digits (real images: every "
                                              "tuner on handwritten digits, both backbones)")],
    output: Annotated[Path, typer.Option(help="folder for results.json, results.md and chart.png")],
    tuners: Annotated[str | None, typer.Option(help="comma-separated presets (default sd: full,lora,adapter,prefix,prompt,res-tuning,bypass; vit adds linear)")] = None,
    model: Annotated[str | None, typer.Option(help="sd15 / vit-b16 (random weights, the default) or a model folder")] = None,
    resolution: Annotated[int | None, typer.Option(help="image side (default: the model's own, 512 / 224)")] = None,
    batch: Annotated[int, typer.Option(help="images per step")] = 1,
    precision: Annotated[str, typer.Option(help="fp32, bf16, or fp16 (CUDA only)")] = "fp32",
    steps: Annotated[int, typer.Option(help="timed AdamW steps per contender and repeat")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed steps before them")] = 1,
    repeats: Annotated[int, typer.Option(help="interleaved rounds; figures are their medians")] = 1,
    sample_steps: Annotated[int, typer.Option(help="SD: DDIM steps timed per image; ViT: inference batches timed")] = 4,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu)")] = None,
    attention: Annotated[str, typer.Option(help="SD: auto, xformers or sdpa (auto: xformers where usable)")] = "auto",
    through_cli: Annotated[bool, typer.Option(help="SD: also measure each tuner through `restune-sd train` (text encoder, VAE, data)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace results already in --output")] = False,
    part: Annotated[str, typer.Option(help="digits: vit, sd or vit,sd")] = "vit,sd",
    seeds: Annotated[str, typer.Option(help="digits: comma-separated seeds; figures are their mean and spread (the sd part uses the first two)")] = "0,1,2,3",
    quick: Annotated[bool, typer.Option(help="digits: a few steps of everything (checks the pipeline; figures mean nothing)")] = False,
    task: Annotated[bool, typer.Option(help="vit: a whole VTAB-1K-sized task's wall time through `classify train` (1,000 "
                                            "images, 100 epochs, batch 64): bypass on cached taps vs LoRA; runs that "
                                            "run the backbone are timed over --steps and extrapolated unless --whole")] = False,
    whole: Annotated[bool, typer.Option(help="vit --task: run every contender's whole task (hours for LoRA on a CPU)")] = False,
    micro_batch: Annotated[int, typer.Option(help="vit --task: images per forward of runs that run the backbone "
                                                  "(gradient accumulation makes up 64)")] = 64,
    sweep: Annotated[int, typer.Option(help="sd: K bypass variants trained on one frozen forward (train --sweep) against "
                                            "one, each in its own process: step time, peak memory above the weights, "
                                            "their ratios", metavar="K")] = 0,
):
    """Measure each tuner in a fresh process of its own, with ratios to LoRA and to full fine-tuning from the same run."""
    if kind == "digits":
        from restune_sd.evaluation.digits import DigitsConfig, run_digits

        run_digits(DigitsConfig(output=output, parts=tuple(part.split(",")), seeds=whole_numbers("--seeds", seeds),
                                presets=tuple(tuners.split(",")) if tuners else None, quick=quick, overwrite=overwrite))
        typer.echo((output / "results.md").read_text())
        return
    if task or whole or micro_batch != 64:
        from restune_sd.errors import UserError
        from restune_sd.evaluation.bench_vit_task import TaskBenchConfig, run_task_bench

        if kind != "vit" or not task or tuners or batch != 1:
            raise UserError("--task, --whole and --micro-batch go together as `bench vit --task`, which times its own "
                            "contenders at batch 64: drop --tuners and --batch")
        run_task_bench(TaskBenchConfig(output=output, steps=steps, warmup=warmup, micro_batch=micro_batch,
                                       precision=precision, whole=whole, overwrite=overwrite))
        typer.echo((output / "results.md").read_text())
        return
    from restune_sd.evaluation.bench import BenchConfig, run_bench

    if sweep:
        from restune_sd.errors import UserError
        from restune_sd.evaluation.bench_sweep import run_sweep_bench

        if tuners or through_cli:
            raise UserError("--sweep measures bypass variants on the library path: drop --tuners and --through-cli")
        run_sweep_bench(BenchConfig(kind=kind, output=output, tuners=["bypass"] if kind == "sd" else None, model=model,
                                    resolution=resolution, batch=batch, precision=precision, steps=steps,
                                    warmup=warmup, repeats=repeats, device=device, attention=attention,
                                    overwrite=overwrite), sweep)
        typer.echo((output / "results.md").read_text())
        return
    cfg = BenchConfig(kind=kind, output=output, tuners=tuners.split(",") if tuners else None, model=model,
                      resolution=resolution, batch=batch, precision=precision, steps=steps, warmup=warmup,
                      repeats=repeats, sample_steps=sample_steps, device=device,
                      attention=attention, through_cli=through_cli,
                      overwrite=overwrite)
    run_bench(cfg)
    typer.echo((output / "results.md").read_text())


def whole_numbers(flag: str, text: str) -> tuple[int, ...]:
    from restune_sd.errors import UserError

    try:
        return tuple(int(word) for word in text.split(","))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated whole numbers such as 0,1,2,3, not {text!r}") from None
