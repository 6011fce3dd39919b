"""Generating images with a stock diffusers pipeline and a saved tuner: `sample(cfg) -> result`.

Image i has its own generator seeded with `seed + i`, so a single image with `--seed S` is exactly what a stock
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

from restune_sd.bounds import MAX_RESOLUTION, MAX_SEED, check_bounds, require_resolution
from restune_sd.errors import UserError
from restune_sd.files import read_json, read_text, warn, write_atomic, write_text_atomic, writing
from restune_sd.runfolder import LOCK, FolderLock, main_process

SCHEDULERS = ("ddim", "dpm", "pndm", "euler")
SETTINGS_FILE = "sample_config.json"
# LoRA files in pickle formats: refused, since loading one can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Far above what anyone samples with (SD's usual guidance is 5-15, FID sets hold 30,000-50,000 images, a GPU fits
# tens of images a call) and far below values that overflow to NaN images or exhaust memory.
MAX_GUIDANCE = 100
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
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 1
    resolution: int | None = None
    negative_prompt: str | None = None
    fp16: bool = True
    attention: str = "auto"

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown --scheduler {self.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
        check_bounds(self, SAMPLE_BOUNDS)
        sources = sum(bool(s) for s in (self.prompts, self.prompts_file, self.coco))
        if sources != 1:
            raise UserError("give prompts one way: --prompt (repeatable), --prompts-file, or --coco ROOT [--num-images N]")


SAMPLE_BOUNDS = {
    "num_images": {"integer": True, "minimum": 1, "maximum": MAX_IMAGES, "optional": True},
    "steps": {"integer": True, "minimum": 1, "maximum": 1000}, "guidance": {"minimum": 0, "maximum": MAX_GUIDANCE},
    "seed": {"integer": True, "minimum": 0, "maximum": MAX_SEED},
    "batch_size": {"integer": True, "minimum": 1, "maximum": MAX_BATCH_SIZE},
    "resolution": {"integer": True, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
}


def read_prompts(cfg: SampleConfig) -> tuple[list[str], list | None]:
    """The job's prompts, and with --coco the chosen (file name, caption) pairs."""
    items = None
    if cfg.prompts:
        prompts = list(cfg.prompts)
    elif cfg.prompts_file:
        text = read_text(cfg.prompts_file, "--prompts-file", "give a UTF-8 text file with one prompt a line")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        from restune_sd.datasets import coco_val_items
        from restune_sd.evaluation.fid import FID_PROTOCOL_IMAGES, fewer_than_protocol

        items = coco_val_items(cfg.coco, cfg.num_images or FID_PROTOCOL_IMAGES, seed=cfg.seed,
                               at_most=cfg.num_images is None)
        prompts = [c for _, c in items]
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


def foreign_lora(tuner: str) -> Path | None:
    """The LoRA file another tool wrote that `tuner` names (a `.safetensors` file, or a folder holding diffusers'
    `pytorch_lora_weights.safetensors` and no restune-sd config), or None for a restune-sd tuner or run directory."""
    from restune_sd.io import CONFIG_FILE, LORA_FILE, WEIGHTS_FILE

    path = Path(tuner)
    if not path.exists():
        raise UserError(f"--tuner {tuner} does not exist: pass a tuner folder, a run directory or a LoRA .safetensors file")
    if path.is_dir():
        found = sorted(path.glob(LORA_FILE.replace(".safetensors", ".*")), key=lambda p: p.suffix != ".safetensors")
        if (path / CONFIG_FILE).is_file() or not found:
            return None  # a restune-sd tuner or run directory (load_tuner says what one lacks)
        path = found[0]
    if path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        raise UserError(f"--tuner {tuner} is a restune-sd tuner's weights file: pass its folder {path.parent}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"--tuner {path} is a pickle ({path.suffix}), which can run code when loaded: use a .safetensors LoRA")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--tuner {tuner} is neither a restune-sd tuner folder or run directory nor a LoRA .safetensors file")
    check_lora_names(path)
    return path


def check_lora_names(path: Path) -> None:
    """Read a LoRA file's tensor names (not its data): a damaged file, or one without LoRA weights, is refused here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"--tuner {path} is not a readable .safetensors file ({str(error).splitlines()[0]})") from None
    if not any("lora" in name for name in names):
        raise UserError(f"--tuner {path} holds no LoRA weights (no tensor name contains 'lora'): pass a LoRA file")


def tuner_identity(tuner: str | None) -> str | None:
    """A tuner's content digest: restune-sd's config and weights, or the foreign LoRA file's bytes."""
    from restune_sd.io import tuner_digest

    if tuner is None:
        return None
    lora = foreign_lora(tuner)
    return hashlib.sha256(lora.read_bytes()).hexdigest() if lora else tuner_digest(tuner)


def job_identity(cfg: SampleConfig, prompts: list[str], tuner: str | None) -> dict:
    """What makes two runs the same job: the model (resolved), the tuner and prompts by content, the settings."""
    local = Path(cfg.model).expanduser()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out", "tuners", "batch_size", "attention", "prompts", "prompts_file", "coco", "model")}
    return {**settings, "model": str(local.resolve()) if local.exists() else cfg.model,
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "tuner_sha256": tuner_identity(tuner)}


def load_foreign_lora(pipe, path: Path) -> None:
    """A LoRA written by another tool (diffusers or kohya keys) through the pipeline's own loader, which must apply it."""
    from diffusers.utils import logging
    from safetensors import SafetensorError

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its "no LoRA keys for the text encoder" warning is normal for UNet-only LoRAs
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    except (ValueError, RuntimeError, KeyError, OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"--tuner {path} is not a LoRA diffusers can apply to this model: {reason}") from None
    finally:
        logging.set_verbosity(level)
    if not any(pipe.get_list_adapters().values()):
        raise UserError(f"--tuner {path} holds no LoRA weights for this model's UNet or text encoder (a LoRA for another "
                        "architecture?)")


def use_scheduler(pipe, name: str, prediction_type: str | None = None) -> None:
    """Give `pipe` the scheduler that `sample` and validation images both draw with: `name`'s class made from the
    model's own scheduler config, predicting what the tuner was trained to predict where it records that.

    Both build their pipeline with the model's scheduler config through StableDiffusionPipeline's constructor (which
    rewrites steps_offset and a clip_sample it finds True) and set this one after it: a DDIM scheduler given to the
    constructor would have its default clip_sample=True turned off there, and so differ from `sample`'s.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **({"prediction_type": prediction_type} if prediction_type else {}))


def trained_prediction_type(tuner: str | None) -> str | None:
    """What a restune-sd tuner's run trained the UNet to predict (epsilon, v_prediction or sample); None for the plain
    model, a LoRA of another tool and tuners saved outside a training run, which sample as the model's own scheduler."""
    from restune_sd.io import read_tuner_config

    if tuner is None or foreign_lora(tuner):
        return None
    return read_tuner_config(tuner).get("prediction_type")


def draw(pipe, prompts: list[str], generators: list, **settings) -> tuple[list, list[int]]:
    """The pipeline's images for `prompts` as PIL images (none if any holds NaN or inf, which a PNG
    would show black), and the positions of those that do; the same images as a stock call with output_type="pil"."""
    with torch.no_grad():
        arrays = pipe(prompts, generator=generators, output_type="np", **settings).images
    non_finite = [n for n, a in enumerate(arrays) if not np.isfinite(a).all()]
    return ([] if non_finite else pipe.numpy_to_pil(arrays)), non_finite


def load_pipeline(model: str, tuner: str | None, device, dtype, attention: str, model_config: str | None = None):
    """A stock StableDiffusionPipeline (from a folder, a hub id or a single-file checkpoint) with the saved tuner (a
    tuner folder or run directory) or a LoRA file of another tool attached."""
    from diffusers import StableDiffusionPipeline

    from restune_sd.attention import set_attention_backend
    from restune_sd.io import load_tuner
    from restune_sd.models import check_pipeline, is_single_file, quiet_loading, single_file_pipeline

    quiet_loading()
    check_pipeline(model, model_config)
    try:
        pipe = (single_file_pipeline(model, model_config, dtype) if is_single_file(model) else
                StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False))
    except OSError as error:
        where = "" if Path(model).exists() else "no local folder of that name exists, and as a hub id: "
        raise UserError(f"cannot load a Stable Diffusion pipeline from {model!r}: {where}{str(error).splitlines()[0]}") from None
    lora = foreign_lora(tuner) if tuner else None
    if lora:
        load_foreign_lora(pipe, lora)
    elif tuner:
        load_tuner(pipe, tuner)
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


def tuner_folder_name(tuner: str) -> str:
    path = Path(tuner)
    if path.suffix == ".safetensors":  # a foreign LoRA file
        return path.stem
    return path.parent.name if path.name == "tuner" else path.name


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
    from restune_sd.models import check_pipeline, require_single_file_configs, vae_factor

    check_pipeline(cfg.model, cfg.model_config)
    require_single_file_configs(cfg.model, cfg.model_config)
    prompts, coco_items = read_prompts(cfg)
    if cfg.resolution is not None:
        require_resolution("--resolution", cfg.resolution, vae_factor(cfg.model, cfg.model_config) or 8)
    identities = {folder: job_identity(cfg, prompts, tuner) for tuner, folder in jobs}
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
            use_scheduler(pipe, cfg.scheduler, trained_prediction_type(tuner))
            label = tuner_folder_name(tuner) if tuner else "base"
            for start in tqdm(range(0, len(todo), cfg.batch_size), desc=f"sample {label}", unit="batch",
                              disable=not state.is_main_process):
                chunk = todo[start : start + cfg.batch_size]
                images, non_finite = draw(
                    pipe, [prompts[i] for i in chunk], [torch.Generator(device).manual_seed(cfg.seed + i) for i in chunk],
                    negative_prompt=[cfg.negative_prompt] * len(chunk) if cfg.negative_prompt else None,
                    num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.resolution, width=cfg.resolution)
                if non_finite:
                    raise UserError(non_finite_message(folder / names[chunk[non_finite[0]]], tuner, cfg.model, dtype))
                for i, image in zip(chunk, images):
                    write_atomic(folder / names[i], lambda tmp: image.save(tmp, format="PNG"),
                                 "the images already written are kept: free some space and run the same command again")
            del pipe
        state.wait_for_everyone()
        if state.is_main_process:
            records = [{"file": names[i], "prompt": p, "seed": cfg.seed + i, **{k: identities[folder][k] for k in
                        ("steps", "guidance", "scheduler", "resolution", "negative_prompt")}, "tuner": tuner}
                       for i, p in enumerate(prompts)]
            write_text_atomic(folder / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            write_atomic(folder / "grid.png", lambda tmp: contact_sheet([folder / n for n in names], tmp))
        results[tuner or "base"] = {"folder": str(folder), "num_images": len(prompts)}
    state.wait_for_everyone()
    return results
