"""`restune-sd sample`: generate images with a trained tuner (or several, or none) through a stock pipeline."""

import json
from pathlib import Path
from typing import Annotated

import typer

from restune_sd.cli.common import user_errors


@user_errors
def sample(
    model: Annotated[str, typer.Option(help="diffusers Stable Diffusion pipeline folder, hub id, or SD v1.x single-file .safetensors/.ckpt")],
    out: Annotated[Path, typer.Option(help="output folder (re-running the same job resumes it)")],
    model_config: Annotated[str | None, typer.Option(help="with a single-file --model: a diffusers SD v1.x pipeline folder whose configs, tokenizer and scheduler to use (needed offline)")] = None,
    tuner: Annotated[list[str] | None, typer.Option(help="tuner folder, run directory, or a LoRA .safetensors file (diffusers or kohya) or folder; repeat for several, each into its own folder (none: the plain model); A+B:0.6 stacks tuners in one pipeline, each at a weight 0 to 10 (default 1)")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="a prompt; repeatable")] = None,
    prompts_file: Annotated[str | None, typer.Option(help="a text file of prompts, one a line, with kohya's per-line options: --n negative --w W --h H --l GUIDANCE --s STEPS --d SEED --ss SCHEDULER")] = None,
    coco: Annotated[str | None, typer.Option(help="COCO2017 root: caption the first --num-images val2017 images (default: all 5,000, the FID protocol's count)")] = None,
    num_images: Annotated[int | None, typer.Option(help="how many images, at most 1,000,000 (prompts repeat if fewer)")] = None,
    steps: Annotated[int, typer.Option(help="denoising steps, 1 to 1000")] = 50,
    guidance: Annotated[float, typer.Option("--guidance-scale", "--guidance", help="classifier-free guidance scale, 0 to 100")] = 7.5,
    guidance_rescale: Annotated[float | None, typer.Option(help="rescale the guided prediction, 0 to 1 (default: 0.7 for a tuner trained with --zero-terminal-snr, else 0)")] = None,
    scheduler: Annotated[str, typer.Option(help="a UI name (ddim, pndm, lms, euler, euler_a, heun, dpm2, dpm2_a, dpm++_2m, dpm++_2m_karras, dpm++_2m_sde, unipc, deis; or as A1111 writes them, 'Euler a', 'DPM++ 2M Karras') or a diffusers scheduler class")] = "ddim",
    karras_sigmas: Annotated[bool, typer.Option(help="Karras sigmas, for schedulers that have them")] = False,
    seed: Annotated[int, typer.Option(help="image i uses seed + i, at most 2**63 - 1")] = 0,
    batch_size: Annotated[int, typer.Option(help="images per pipeline call, at most 1024")] = 1,
    resolution: Annotated[int | None, typer.Option(help="square image size (default: the model's own)")] = None,
    width: Annotated[int | None, typer.Option(help="image width, a multiple of 8 up to 4096 (default: the model's own)")] = None,
    height: Annotated[int | None, typer.Option(help="image height, a multiple of 8 up to 4096 (default: the model's own)")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="negative prompt")] = None,
    fp16: Annotated[bool, typer.Option(help="fp16 weights on CUDA (ignored on CPU)")] = True,
    attention: Annotated[str, typer.Option(help="auto, xformers or sdpa")] = "auto",
):
    """Generate PNGs, a samples.jsonl and a contact-sheet grid.png for each tuner."""
    from restune_sd.sample import SampleConfig, sample as run_sampling

    tuners = [t for t in (tuner or []) if t.lower() != "none"]
    results = run_sampling(SampleConfig(
        model=model, out=str(out), model_config=model_config, tuners=tuners, prompts=prompt or [], prompts_file=prompts_file, coco=coco,
        num_images=num_images, steps=steps, guidance=guidance, scheduler=scheduler, karras_sigmas=karras_sigmas, seed=seed,
        batch_size=batch_size, resolution=resolution, width=width, height=height, negative_prompt=negative_prompt, fp16=fp16,
        attention=attention, guidance_rescale=guidance_rescale,
    ))
    typer.echo(json.dumps(results, indent=2))
