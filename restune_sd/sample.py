"""Generating images with a stock diffusers pipeline and a saved tuner: `sample(cfg) -> result`.

Image i has its own generator seeded with `seed + i` (or, on a prompts-file line with kohya's `--d D`, D + k for that
line's k-th image), so a single image with `--seed S` is exactly what a stock
pipeline gives with `generator=torch.Generator(device).manual_seed(S)` (its scheduler predicting what the tuner was
trained to predict), whatever the batch size or the number of processes, up to float rounding (batched attention can
differ by 1/255 on a few pixels). Each PNG is written atomically; an interrupted job skips the images it already has,
and only a job with the same model, tuner (by content), prompts (by content) and settings counts as the same job.
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from restune_sd.bounds import MAX_GUIDANCE, MAX_RESOLUTION, MAX_SAMPLING_STEPS, MAX_SEED, check_bounds
from restune_sd.errors import UserError
from restune_sd.files import read_json, warn, write_atomic, write_text_atomic, writing
from restune_sd.prompts import (Prompt, batches, check_draws, draw_settings, image_seeds, pipeline_arguments,
                                read_prompt_file)
from restune_sd.runfolder import LOCK, FolderLock, main_process
from restune_sd.stacking import apply_tuner, trained_prediction_type, tuner_folder_name, tuner_identity

SETTINGS_FILE = "sample_config.json"
# Far above what anyone samples with (FID sets hold 30,000-50,000 images, a GPU fits tens of images a call) and far
# below what exhausts memory.
MAX_IMAGES = 1_000_000
MAX_BATCH_SIZE = 1024


@dataclass
class SampleConfig:
    """What a sampling job depends on; written to OUT/sample_config.json (or OUT/<tuner>/ for several tuners)."""

    model: str
    out: str
    model_config: str | None = None  # a single-file --model's diffusers pipeline folder (configs, tokenizer, scheduler)
    tuners: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    coco: str | None = None
    num_images: int | None = None
    steps: int = 50
    guidance: float = 7.5  # --guidance-scale
    scheduler: str = "ddim"  # a UI name or a diffusers class (restune_sd.schedulers)
    karras_sigmas: bool = False
    seed: int = 0
    batch_size: int = 1
    resolution: int | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    fp16: bool = True
    attention: str = "auto"
    guidance_rescale: float | None = None  # None: 0.7 for a tuner trained with zero terminal SNR, else 0

    def __post_init__(self):
        from restune_sd.schedulers import scheduler_spec

        scheduler_spec(self.scheduler, self.karras_sigmas)
        check_bounds(self, SAMPLE_BOUNDS)
        if self.resolution is not None and (self.width is not None or self.height is not None):
            raise UserError("give the image size as --resolution (square) or as --width/--height, not both")
        sources = sum(bool(s) for s in (self.prompts, self.prompts_file, self.coco))
        if sources != 1:
            raise UserError("give prompts one way: --prompt (repeatable), --prompts-file, or --coco ROOT [--num-images N]")


SAMPLE_BOUNDS = {
    "num_images": {"integer": True, "minimum": 1, "maximum": MAX_IMAGES, "optional": True},
    "steps": {"integer": True, "minimum": 1, "maximum": MAX_SAMPLING_STEPS},
    "guidance": {"minimum": 0, "maximum": MAX_GUIDANCE},
    "guidance_rescale": {"minimum": 0, "maximum": 1, "optional": True},
    "seed": {"integer": True, "minimum": 0, "maximum": MAX_SEED},
    "batch_size": {"integer": True, "minimum": 1, "maximum": MAX_BATCH_SIZE},
    "resolution": {"integer": True, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
    "width": {"integer": True, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
    "height": {"integer": True, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
}


def read_prompts(cfg: SampleConfig) -> tuple[list[Prompt], list | None]:
    """The job's prompts (a prompts file's lines with their kohya options), and with --coco the chosen (file name,
    caption) pairs."""
    items = None
    if cfg.prompts:
        prompts = [Prompt(p) for p in cfg.prompts]
    elif cfg.prompts_file:
        prompts = read_prompt_file(cfg.prompts_file, "--prompts-file")
    else:
        from restune_sd.datasets import coco_val_items
        from restune_sd.evaluation.fid import FID_PROTOCOL_IMAGES, fewer_than_protocol

        items = coco_val_items(cfg.coco, cfg.num_images or FID_PROTOCOL_IMAGES, seed=cfg.seed,
                               at_most=cfg.num_images is None)
        prompts = [Prompt(c) for _, c in items]
        if len(items) < FID_PROTOCOL_IMAGES and main_process():
            warn(fewer_than_protocol(len(items), "sampled from COCO2017 val"))
    if cfg.num_images and not cfg.coco:
        prompts = [prompts[i % len(prompts)] for i in range(cfg.num_images)]
    if not prompts:
        raise UserError("no prompts to sample: the prompts file is empty")
    if len(prompts) > MAX_IMAGES:
        raise UserError(f"--prompts-file holds {len(prompts)} prompts, more than the {MAX_IMAGES} images one job samples: "
                        "split it into several files")
    if cfg.seed + len(prompts) - 1 > MAX_SEED:  # image i is drawn with seed + i
        raise UserError(f"--seed {cfg.seed} is too large for {len(prompts)} images: image {len(prompts) - 1} would have "
                        f"seed {cfg.seed + len(prompts) - 1}, above {MAX_SEED}; use a smaller --seed")
    return prompts, items


def job_identity(cfg: SampleConfig, prompts: list[Prompt], tuner: str | None) -> dict:
    """What makes two runs the same job: the model (resolved), the tuner and prompts by content, the settings."""
    local = Path(cfg.model).expanduser()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out", "tuners", "batch_size", "attention", "prompts", "prompts_file", "coco", "model")}
    return {**settings, "model": str(local.resolve()) if local.exists() else cfg.model,
            "prompts_sha256": hashlib.sha256(json.dumps([[p.text, p.options] if p.options else p.text
                                                         for p in prompts]).encode()).hexdigest(),
            "tuner_sha256": tuner_identity(tuner)}


def use_scheduler(pipe, name: str, prediction_type: str | None = None, karras_sigmas: bool = False,
                  config=None) -> None:
    """Give `pipe` the scheduler that `sample` and validation images both draw with: `name` (restune_sd.schedulers)
    made from the model's own scheduler config (`config`, default the pipeline's), with Karras sigmas where asked,
    predicting what the tuner was trained to predict where it records that.

    Both build their pipeline with the model's scheduler config through StableDiffusionPipeline's constructor (which
    rewrites steps_offset and a clip_sample it finds True) and set this one after it: a DDIM scheduler given to the
    constructor would have its default clip_sample=True turned off there, and so differ from `sample`'s.
    """
    from restune_sd.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(config or pipe.scheduler.config, name, karras_sigmas, prediction_type,
                                    pipe.scheduler.compatibles)


def draw(pipe, prompts: list[str], generators: list, clip_skip: int | None = None,
         **settings) -> tuple[list, list[int]]:
    """The pipeline's images for `prompts` as PIL images (none if any holds NaN or inf, which a PNG
    would show black), and the positions of those that do; the same images as a stock call with output_type="pil".
    With `clip_skip`, prompts and negative prompts go in as embeddings (restune_sd.trained_with.prompt_embeddings)."""
    with torch.no_grad():
        if clip_skip:
            from restune_sd.trained_with import prompt_embeddings

            settings.update(prompt_embeddings(pipe, prompts, settings.pop("negative_prompt", None), clip_skip))
            prompts = None
        arrays = pipe(prompts, generator=generators, output_type="np", **settings).images
    non_finite = [n for n, a in enumerate(arrays) if not np.isfinite(a).all()]
    return ([] if non_finite else pipe.numpy_to_pil(arrays)), non_finite


def load_pipeline(model: str, tuner: str | None, device, dtype, attention: str, model_config: str | None = None):
    """A stock StableDiffusionPipeline (from a folder, a hub id or a single-file checkpoint) with the saved tuner (a
    tuner folder or run directory), a LoRA file of another tool, or a weighted stack of them attached."""
    from diffusers import StableDiffusionPipeline

    from restune_sd.attention import set_attention_backend
    from restune_sd.models import check_pipeline, is_single_file, quiet_loading, single_file_pipeline

    quiet_loading()
    check_pipeline(model, model_config)
    try:
        pipe = (single_file_pipeline(model, model_config, dtype) if is_single_file(model) else
                StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False))
    except OSError as error:
        where = "" if Path(model).exists() else "no local folder of that name exists, and as a hub id: "
        raise UserError(f"cannot load a Stable Diffusion pipeline from {model!r}: {where}{str(error).splitlines()[0]}") from None
    if tuner:
        apply_tuner(pipe, tuner)
    set_attention_backend(pipe.unet, attention)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def contact_sheet(paths: list[Path], out: Path, limit: int = 64) -> Path | None:
    from PIL import Image

    paths = paths[:limit]
    if not paths:
        return None
    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    sheet.save(out, format="PNG")
    return out


def non_finite_message(image: Path, tuner: str | None, model: str, dtype) -> str:
    cause = f"the tuner {tuner} likely holds diverged weights (train it again, e.g. at a lower learning rate)" if tuner \
        else f"the model {model} gives non-finite values"
    precision = "; or the model overflows in float16: try --no-fp16" if dtype == torch.float16 else ""
    return (f"{image} came out NaN or infinite and was not written: {cause}{precision}. The images already written "
            "are kept")


def image_plan(cfg: SampleConfig, prompts: list[Prompt], factor: int) -> tuple[list[dict], list[int]]:
    """Each image's draw settings (the command's, under its prompt line's own) and seed, checked before anything is
    written; sizes must be multiples of the VAE's downsampling `factor`."""
    check_draws(prompts, {f"--{n}": getattr(cfg, n) for n in ("resolution", "width", "height")}, factor, cfg.karras_sigmas)
    defaults = {"negative_prompt": cfg.negative_prompt, "width": cfg.width or cfg.resolution,
                "height": cfg.height or cfg.resolution, "guidance_scale": cfg.guidance, "steps": cfg.steps,
                "scheduler": cfg.scheduler, "karras_sigmas": cfg.karras_sigmas}
    return [draw_settings(p, defaults) for p in prompts], image_seeds(prompts, cfg.seed)


def image_record(cfg: SampleConfig, settings: dict) -> dict:
    """What samples.jsonl records of how an image was drawn (a size of None: the model's own)."""
    return {"steps": settings["steps"], "guidance": settings["guidance_scale"], "scheduler": settings["scheduler"],
            "karras_sigmas": settings["karras_sigmas"], "resolution": cfg.resolution, "width": settings["width"],
            "height": settings["height"], "negative_prompt": settings["negative_prompt"]}


def sample(cfg: SampleConfig) -> dict:
    """Generate every prompt's image (for each tuner), resumably and split across accelerate processes; the writing
    process holds --out's lock throughout, so two commands never write one folder."""
    if not main_process():
        return sample_into(cfg)
    with FolderLock(Path(cfg.out), "--out"):
        return sample_into(cfg)


def sample_into(cfg: SampleConfig) -> dict:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())  # several launched CPU processes join over gloo
    device = state.device
    dtype = torch.float16 if cfg.fp16 and device.type == "cuda" else torch.float32
    out = Path(cfg.out)
    tuners = cfg.tuners or [None]
    jobs = [(t, out / tuner_folder_name(t) if len(tuners) > 1 else out) for t in tuners]
    folder_names = [folder.name for _, folder in jobs]
    if len(set(folder_names)) < len(folder_names):
        twice = next(n for n in folder_names if folder_names.count(n) > 1)
        raise UserError(f"two tuners would sample into {out / twice}: give them folders of different names")
    from restune_sd.models import check_pipeline, require_single_file_configs, text_encoder_layers, vae_factor
    from restune_sd.trained_with import call_settings, check_sampling, scheduler_config, trained_with

    check_pipeline(cfg.model, cfg.model_config)
    require_single_file_configs(cfg.model, cfg.model_config)
    prompts, coco_items = read_prompts(cfg)
    settings, seeds = image_plan(cfg, prompts, vae_factor(cfg.model, cfg.model_config) or 8)
    identities = {folder: job_identity(cfg, prompts, tuner) for tuner, folder in jobs}
    for tuner, _ in jobs:  # the clip skip and zero terminal SNR the tuner was trained with
        check_sampling(tuner, {s["scheduler"] for s in settings}, text_encoder_layers(cfg.model, cfg.model_config))
    for _, folder in jobs:  # every process checks before anything is written
        saved = folder / SETTINGS_FILE
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out: {folder} is a file, not a folder: choose another --out (nothing is overwritten)")
        if saved.exists():  # an earlier run of this job: resume it, if it is the same job
            fix = f"remove {saved} and the images beside it, or choose a new --out"
            if read_json(saved, fix).get("settings") != identities[folder]:
                raise UserError(f"{folder} holds samples of another job (other model, tuner, prompts or settings): "
                                "choose a new --out (nothing is overwritten)")
        elif folder.exists() and any(p.name != LOCK for p in folder.iterdir()):
            raise UserError(f"{folder} already holds files: choose a new --out (nothing is overwritten)")
    state.wait_for_everyone()
    with writing(out, "choose an --out where you can write"):
        out.mkdir(parents=True, exist_ok=True)
    if coco_items is not None and state.is_main_process:
        write_text_atomic(out / "coco_captions.jsonl", "".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c in coco_items))

    results = {}
    for tuner, folder in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        if state.is_main_process:
            write_text_atomic(folder / SETTINGS_FILE, json.dumps({"settings": identities[folder], "tuner": tuner}, indent=2) + "\n")
        names = [f"{i:05d}.png" for i in range(len(prompts))]
        mine = [i for i in range(len(prompts)) if i % state.num_processes == state.process_index]
        todo = [i for i in mine if not (folder / names[i]).exists()]
        if todo:
            pipe = load_pipeline(cfg.model, tuner, device, dtype, cfg.attention, cfg.model_config)
            prediction, trained = trained_prediction_type(tuner), trained_with(tuner)
            model_scheduler = scheduler_config(pipe.scheduler.config, trained["zero_terminal_snr"])
            label = tuner_folder_name(tuner) if tuner else "base"
            for chunk in tqdm(batches(todo, settings, cfg.batch_size), desc=f"sample {label}", unit="batch",
                              disable=not state.is_main_process):
                chosen = settings[chunk[0]]  # a batch's images share their settings
                use_scheduler(pipe, chosen["scheduler"], prediction, chosen["karras_sigmas"], model_scheduler)
                images, non_finite = draw(pipe, [prompts[i].text for i in chunk],
                                          [torch.Generator(device).manual_seed(seeds[i]) for i in chunk],
                                          **pipeline_arguments(chosen, len(chunk)),
                                          **call_settings(trained, cfg.guidance_rescale))
                if non_finite:
                    raise UserError(non_finite_message(folder / names[chunk[non_finite[0]]], tuner, cfg.model, dtype))
                for i, image in zip(chunk, images):
                    write_atomic(folder / names[i], lambda tmp: image.save(tmp, format="PNG"),
                                 "the images already written are kept: free some space and run the same command again")
            del pipe
        state.wait_for_everyone()
        if state.is_main_process:
            records = [{"file": names[i], "prompt": p.text, "seed": seeds[i], **image_record(cfg, settings[i]), "tuner": tuner}
                       for i, p in enumerate(prompts)]
            write_text_atomic(folder / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            write_atomic(folder / "grid.png", lambda tmp: contact_sheet([folder / n for n in names], tmp))
        results[tuner or "base"] = {"folder": str(folder), "num_images": len(prompts)}
    state.wait_for_everyone()
    return results
