"""Fine-tuning a frozen SD UNet with any tuner: `train(cfg) -> result`, on accelerate (CPU, one or many GPUs).

Every random draw (data order, noise, timestep, VAE sample) is a pure function of the seed, the step and the
sample's position in the global batch, so a resumed run and a run split over N processes see the same numbers
as one uninterrupted process with the combined batch.
"""

import dataclasses
import json
import math
import os
import pickle
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from restune_sd.bounds import MAX_RESOLUTION, check_bounds, require_number, require_resolution
from restune_sd.config import TuningConfig, resolve_tuner
from restune_sd.errors import UserError
from restune_sd.files import warn, write_atomic, write_text_atomic, writing

CHECKPOINTS = "checkpoints"
# What `train` writes into a run directory before its first checkpoint: a folder holding config.json and only these
# (no checkpoint, no tuner, no results) is an attempt that stopped early, which a new run may take over.
EARLY_RUN_FILES = ("config.json", "metrics.jsonl", "cache.pt", CHECKPOINTS, "validation", "tensorboard")
CACHE_KEYS = "2*index+flipped"
CHECKPOINT_KEYS = ("step", "tuner", "optimizer", "scheduler", "rng", "config", "tuning")
# Settings a resumed run may change: they decide how long it runs, what it records and how fast, never what it learns.
SAFE_ON_RESUME = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "validation_prompt", "validation_every",
                  "validation_steps", "tensorboard", "num_workers", "attention", "gradient_checkpointing")


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to RUN_DIR/config.json."""

    model: str = field(metadata={"help": "diffusers SD pipeline folder or hub id"})
    data: str = field(metadata={"help": "PREFIX:ROOT data spec (coco:, cub:, flowers102:, cars:, aircraft:, food101:, classfolder:, folder:)"})
    tuner: str = field(metadata={"help": "preset name or YAML/JSON tuner config"})
    output: str = field(metadata={"help": "run directory (must be new or empty, unless resuming)"})
    split: str = "train"
    resolution: int | None = None
    center_crop: bool = True
    random_flip: bool = False
    caption_template: str = "a photo of a {}"
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    prediction_type: str | None = None
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    attention: str = "auto"
    cache: bool = False  # VAE latents (per image and flip) and text embeddings, kept in RUN_DIR/cache.pt
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    validation_prompt: str | None = None
    validation_every: int = 0
    validation_steps: int = 25
    tensorboard: bool = False
    num_workers: int = 0

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        if self.lr_scheduler not in ("constant", "cosine"):
            raise UserError(f"unknown --lr-scheduler {self.lr_scheduler!r}: use constant or cosine")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"unknown --mixed-precision {self.mixed_precision!r}: use no, fp16 or bf16")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise UserError(f"unknown --prediction-type {self.prediction_type!r}: use epsilon or v_prediction")
        check_bounds(self, TRAIN_BOUNDS)
        if len(self.adam_betas) != 2:
            raise UserError(f"adam_betas must be two numbers, not {self.adam_betas!r}")
        for beta in self.adam_betas:
            require_number("adam_betas", beta, minimum=0, maximum=0.9999999)
        if self.cache and not self.center_crop:
            raise UserError("--cache stores one latent per image and flip: it needs centre crops, not --no-center-crop")


WHOLE = {"integer": True}
TRAIN_BOUNDS = {
    "resolution": {**WHOLE, "minimum": 8, "maximum": MAX_RESOLUTION, "optional": True},
    "epochs": {**WHOLE, "minimum": 1}, "batch_size": {**WHOLE, "minimum": 1}, "gradient_accumulation": {**WHOLE, "minimum": 1},
    "max_steps": {**WHOLE, "minimum": 1, "optional": True}, "warmup_steps": {**WHOLE, "minimum": 0},
    "learning_rate": {"above": 0}, "weight_decay": {"minimum": 0}, "adam_epsilon": {"above": 0},
    "max_grad_norm": {"minimum": 0}, "snr_gamma": {"above": 0, "optional": True}, "noise_offset": {"minimum": 0},
    "seed": {**WHOLE, "minimum": 0}, "checkpoint_every": {**WHOLE, "minimum": 0}, "keep_checkpoints": {**WHOLE, "minimum": 1},
    "validation_every": {**WHOLE, "minimum": 0}, "validation_steps": {**WHOLE, "minimum": 1},
    "num_workers": {**WHOLE, "minimum": 0},
}


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then constant or cosine to zero; counted in optimizer steps, whatever the process count."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seeded(*parts: int) -> torch.Generator:
    """A generator whose seed mixes integers, for draws that must not depend on process layout or history."""
    mixed = 0x9E3779B97F4A7C15
    for part in parts:
        mixed = (mixed ^ (int(part) + 0x632BE59BD9B4E019 + (mixed << 6) + (mixed >> 2))) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(mixed)


class SampleStream(torch.utils.data.Dataset):
    """Position p of an endless stream: epoch p // N, the p % N-th item of that epoch's seeded permutation."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._perms = {}

    def locate(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=seeded(self.seed, epoch))}
        return epoch, int(self._perms[epoch][offset])

    def __len__(self):
        return 2**62

    def __getitem__(self, position: int):
        epoch, index = self.locate(position)
        self.dataset.set_epoch(epoch)
        item = dict(self.dataset[index])
        item["position"], item["index"] = position, index
        return item


@dataclass
class Components:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object


def load_components(model: str, device, dtype) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from restune_sd.models import check_pipeline

    check_pipeline(model)
    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype).to(device),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype).to(device),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device),
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
        )
    except OSError as error:
        where = "" if Path(model).exists() else "no local folder of that name exists, and as a hub id: "
        raise UserError(f"cannot load a Stable Diffusion pipeline from {model!r}: {where}{str(error).splitlines()[0]}") from None


@dataclass
class RunPlan:
    """Where a run writes and what it resumes: the checkpoint's path and contents, or stale files to clear first."""

    run: Path
    checkpoint: Path | None = None
    state: dict | None = None
    stale: list[Path] = field(default_factory=list)


def locate_run(cfg: TrainConfig) -> RunPlan:
    """The run directory and the checkpoint to resume from (none for a fresh run); reads only, never writes."""
    run = Path(cfg.output)
    if cfg.resume is None:
        if run.exists() and not run.is_dir():
            raise UserError(f"{run} is a file: choose a new --output folder")
        held = sorted(run.iterdir()) if run.is_dir() else []
        if held and not abandoned_attempt(run, held):
            raise UserError(f"{run} already holds files: choose a new --output, or pass --resume latest to continue it")
        if held:
            warn(f"{run} holds an earlier attempt that stopped before its first checkpoint: starting it over")
        return RunPlan(run, stale=held)
    if cfg.resume == "latest":
        found = sorted((run / CHECKPOINTS).glob("step-*.pt")) if (run / CHECKPOINTS).is_dir() else []
        if not found:
            raise UserError(f"--resume latest: {run / CHECKPOINTS} holds no checkpoint to resume from; run again without "
                            "--resume to start over (an attempt that stopped before its first checkpoint is taken over)")
        damaged = []
        for checkpoint in reversed(found):
            try:
                state = load_checkpoint(checkpoint)
            except UserError as error:
                damaged.append(str(error))
                continue
            for reason in damaged:
                warn(f"{reason}; resuming from {checkpoint.name}, the newest intact checkpoint")
            return RunPlan(run, checkpoint, state)
        raise UserError(f"--resume latest: no checkpoint in {run / CHECKPOINTS} can be used ({damaged[0]}); "
                        "start a new --output")
    checkpoint = Path(cfg.resume)
    if not checkpoint.is_file():
        raise UserError(f"--resume {checkpoint}: no such checkpoint file (use latest, or a step-*.pt file)")
    return RunPlan(run, checkpoint, load_checkpoint(checkpoint))


def abandoned_attempt(run: Path, held: list[Path]) -> bool:
    """Only files `train` writes before its first checkpoint, and no checkpoint: nothing a retry could lose."""
    names = {p.name for p in held if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    if "config.json" not in names or not names <= set(EARLY_RUN_FILES):
        return False
    return not any((run / CHECKPOINTS).glob("step-*.pt"))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, read without running any code it may carry; a UserError says why it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise UserError(f"checkpoint {path} holds objects that could run code when loaded, so it is not loaded") from None
        raise UserError(f"checkpoint {path} is damaged ({str(error).splitlines()[0]})") from None
    except Exception as error:  # a truncated or empty file: torch raises RuntimeError, EOFError, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"checkpoint {path} is damaged ({reason})") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise UserError(f"checkpoint {path} is not a restune-sd checkpoint of this version (it lacks the run's settings)")
    return state


def same_setting(name: str, old, new) -> bool:
    """Whether two values of a setting mean the same run: local model and data paths compare resolved."""
    if name == "model":
        return resolved(old) == resolved(new)
    if name == "data":
        (old_prefix, _, old_root), (new_prefix, _, new_root) = str(old).partition(":"), str(new).partition(":")
        return old_prefix.lower() == new_prefix.lower() and resolved(old_root) == resolved(new_root)
    if name == "tuner":
        return old == new or resolved(old) == resolved(new)
    if name == "adam_betas":
        return list(old) == list(new)
    return old == new


def resolved(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def settings_given(cfg: TrainConfig) -> set[str]:
    """The settings a library caller chose: those not at their default value."""
    return {f.name for f in dataclasses.fields(TrainConfig)
            if f.default is dataclasses.MISSING or not same_setting(f.name, f.default, getattr(cfg, f.name))}


def resumed_config(cfg: TrainConfig, saved: dict, given: set[str]) -> TrainConfig:
    """The run's own settings, with the safe ones among those the user `given`.

    Changing any other setting is refused in one line: the checkpoint's weights and optimizer state belong to them.
    """
    merged = {}
    for name in (f.name for f in dataclasses.fields(TrainConfig)):
        new, old = getattr(cfg, name), saved.get(name, getattr(cfg, name))
        if name in ("output", "resume") or (name in given and name in SAFE_ON_RESUME):
            merged[name] = new
        elif name in given and not same_setting(name, old, new):
            raise UserError(f"--resume: this run was started with {name}={old!r}, not {new!r}; resume with the same "
                            "settings (or leave them out) or start a new --output")
        else:
            merged[name] = old
    return TrainConfig(**merged)


def atomic_torch_save(obj, path: Path, hint: str = "") -> None:
    """Write then rename, so a run killed mid-write (or a full disk) leaves the previous file intact."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp), hint)


def rng_state() -> dict:
    """Every generator the run touches, as tensors and plain values, so a checkpoint loads with weights_only=True."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensorboard_writer():
    """TensorBoard's SummaryWriter class, checked before a run writes anything."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def require_writable(run: Path) -> None:
    """Fail in a second, not after the model has loaded, when --output lies where nothing can be written."""
    existing = next(p for p in (run, *run.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write the run directory {run} ({existing} is not a writable folder): "
                        "choose an --output where you can write")


def disk_hint(last_checkpoint: Path | None) -> str:
    if last_checkpoint:
        return f"free some space, then --resume latest (the last good checkpoint is {last_checkpoint})"
    return "free some space and run again (the run wrote no checkpoint yet)"


def read_metrics(path: Path) -> list[dict]:
    """The logged steps of an earlier part of the run; a line torn by a kill mid-write is dropped with a warning."""
    if not path.exists():
        return []
    history = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
            history.append({**entry, "step": int(entry["step"])})
        except (ValueError, TypeError, KeyError):
            warn(f"{path} line {number} is damaged and is left out of the loss curve")
    return history


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process


class Encoders:
    """The frozen VAE and text encoder, with optional caches so later epochs skip them."""

    def __init__(self, comps: Components, dtype, cache_file: Path | None):
        self.comps, self.dtype, self.cache_file = comps, dtype, cache_file
        self.latents = {} if cache_file else None  # 2 * dataset index + flipped -> (mean, std)
        self.texts = {} if cache_file else None  # caption -> embedding
        if cache_file and cache_file.is_file():
            try:
                saved = torch.load(cache_file, map_location="cpu", weights_only=True)
            except Exception as error:  # only a cache: a damaged one is rebuilt, never trusted
                saved = {}
                warn(f"{cache_file} cannot be read ({(str(error).splitlines() or [type(error).__name__])[0]}); rebuilding it")
            if saved.get("keys") == CACHE_KEYS:  # an older cache keyed latents by image alone: rebuilt, not misread
                self.latents, self.texts = saved["latents"], saved["texts"]

    def save(self) -> None:
        """Persist the caches (atomically) so a resumed run skips the frozen encoders too."""
        if self.cache_file:
            atomic_torch_save({"keys": CACHE_KEYS, "latents": self.latents, "texts": self.texts}, self.cache_file,
                              "free some space")

    @torch.no_grad()
    def text(self, captions: list[str], device) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if self.texts is None or c not in self.texts]
        fresh = {}
        if missing:
            tokens = self.comps.tokenizer(missing, padding="max_length", truncation=True,
                                          max_length=self.comps.tokenizer.model_max_length, return_tensors="pt")
            embedded = self.comps.text_encoder(tokens.input_ids.to(device))[0]
            fresh = dict(zip(missing, embedded))
            if self.texts is not None:
                self.texts.update({c: e.cpu() for c, e in fresh.items()})
        return torch.stack([(fresh[c] if c in fresh else self.texts[c].to(device)) for c in captions])

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor, indices: list[int], device):
        if self.latents is not None and all(i in self.latents for i in indices):
            mean, std = zip(*(self.latents[i] for i in indices))
            return torch.stack(mean).to(device), torch.stack(std).to(device)
        dist = self.comps.vae.encode(pixels.to(device, self.dtype)).latent_dist
        if self.latents is not None:
            for i, m, s in zip(indices, dist.mean, dist.std):
                self.latents[i] = (m.cpu(), s.cpu())
        return dist.mean, dist.std


def diffusion_loss(unet, encoders: Encoders, batch: dict, cfg: TrainConfig, step: int, device) -> torch.Tensor:
    """The denoising loss of one micro-batch; noise, timestep and latent sample drawn per sample from (seed, step, position)."""
    scheduler = encoders.comps.noise_scheduler
    keys = (2 * batch["index"] + batch["flipped"].long()).tolist()  # a flipped image has a latent of its own
    mean, std = encoders.latent_moments(batch["pixel_values"], keys, device)
    gens = [seeded(cfg.seed, step, int(p)) for p in batch["position"]]
    shape = mean.shape[1:]
    draw = lambda g: torch.randn(shape, generator=g)  # noqa: E731
    latents = (mean + std * torch.stack([draw(g) for g in gens]).to(device, mean.dtype)).float()
    latents = latents * encoders.comps.vae.config.scaling_factor
    noise = torch.stack([draw(g) for g in gens]).to(device)
    if cfg.noise_offset:
        offsets = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in gens]).to(device)
        noise = noise + cfg.noise_offset * offsets
    timesteps = torch.stack([torch.randint(0, scheduler.config.num_train_timesteps, (), generator=g) for g in gens]).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = encoders.text(batch["caption"], device)
    prediction = unet(noisy, timesteps, context).sample.float()  # autocast casts for frozen fp16/bf16 weights
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        v_prediction = scheduler.config.prediction_type == "v_prediction"
        per_sample = per_sample * torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if v_prediction else snr)
    return per_sample.mean()


def tuner_state_dict(unet) -> dict:
    params = dict(unet.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in unet.restune.param_names}


def save_checkpoint(run: Path, step: int, unet, optimizer, scheduler, cfg: TrainConfig, tuning: TuningConfig,
                    last: Path | None) -> Path:
    """A resumable checkpoint: the tuner, optimizer, schedule, RNGs and the run's settings, as tensors and plain values."""
    folder = run / CHECKPOINTS
    path = folder / f"step-{step:08d}.pt"
    hint = disk_hint(last)
    with writing(folder, hint):
        folder.mkdir(exist_ok=True)
    atomic_torch_save({"step": step, "tuner": tuner_state_dict(unet), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": dataclasses.asdict(cfg),
                       "tuning": tuning.to_dict()}, path, hint)
    for old in sorted(folder.glob("step-*.pt"))[:-cfg.keep_checkpoints]:
        old.unlink()
    return path


def validation_image(comps: Components, unet, cfg: TrainConfig, step: int, run: Path, device) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad():
        image = pipe(cfg.validation_prompt, num_inference_steps=cfg.validation_steps, generator=generator,
                     height=cfg.resolution, width=cfg.resolution).images[0]
    (run / "validation").mkdir(exist_ok=True)
    path = run / "validation" / f"step-{step:08d}.png"
    image.save(path)
    return path


def train(cfg: TrainConfig, given: set[str] | None = None) -> dict:
    """Run (or resume) a training job; returns the results also written to RUN_DIR/results.json.

    On resume every setting comes from the checkpoint; `given` names the ones the user set (default: those not at
    their default value), and only SAFE_ON_RESUME ones may differ.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    from restune_sd.attention import set_attention_backend
    from restune_sd.datasets import build_dataset
    from restune_sd.evaluation.plots import loss_curve_png
    from restune_sd.inject import attach
    from restune_sd.io import save_tuner
    from restune_sd.models import check_pipeline, native_resolution, pipeline_resolution, quiet_loading, vae_factor
    from restune_sd.summary import parameter_summary

    plan = locate_run(cfg)  # every process checks before anything is written, so none waits on a failed one
    run, checkpoint = plan.run, plan.checkpoint
    if plan.state is not None:
        given = settings_given(cfg) if given is None else given
        cfg = resumed_config(cfg, plan.state["config"], given)
        tuning = TuningConfig.from_dict(plan.state["tuning"])
        if "tuner" in given and resolve_tuner(cfg.tuner, "unet").to_dict() != tuning.to_dict():
            raise UserError(f"--resume: tuner {cfg.tuner!r} is not the one this run was started with; leave --tuner out")
    else:
        tuning = resolve_tuner(cfg.tuner, "unet")
    writer_class = tensorboard_writer() if cfg.tensorboard else None
    # accelerate keeps one AcceleratorState per process; each train() call sets its own precision (the process
    # group in PartialState is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: that is what makes accelerate join several launched processes over gloo.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                              cpu=not torch.cuda.is_available())
    device = accelerator.device
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs a CUDA GPU: use no or bf16 on CPU")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    require_writable(run)

    def data(resolution):
        return build_dataset(cfg.data, split=cfg.split, resolution=resolution, center_crop=cfg.center_crop,
                             random_flip=cfg.random_flip, caption_template=cfg.caption_template, seed=cfg.seed)

    # The data and the model folder are checked before any model is loaded: a bad root fails in a second, not after minutes.
    check_pipeline(cfg.model)
    factor = vae_factor(cfg.model)
    if cfg.resolution is not None and factor:
        require_resolution("--resolution", cfg.resolution, factor)
    resolution = cfg.resolution or pipeline_resolution(cfg.model)
    dataset = data(resolution) if resolution else None
    quiet_loading()
    comps = load_components(cfg.model, device, weight_dtype)
    if cfg.prediction_type:
        comps.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    cfg = dataclasses.replace(cfg, resolution=resolution or native_resolution(comps.unet.config, comps.vae.config))
    require_resolution("--resolution", cfg.resolution, 2 ** (len(comps.vae.config.block_out_channels) - 1))
    dataset = dataset or data(cfg.resolution)

    torch.manual_seed(cfg.seed)  # the tuners' random initialisation
    unet = attach(comps.unet, tuning)
    if not tuning.full and weight_dtype != torch.float32:
        unet.to(dtype=weight_dtype)
        for name, p in unet.named_parameters():  # trainable parameters stay fp32 under fp16/bf16 autocast
            if p.requires_grad:
                p.data = p.data.float()
    backend = set_attention_backend(unet, cfg.attention)
    if cfg.gradient_checkpointing and not tuning.bypass:
        unet.enable_gradient_checkpointing()
        unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    summary = parameter_summary(unet)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  eps=cfg.adam_epsilon)

    global_batch = cfg.batch_size * accelerator.num_processes
    steps_per_epoch = max(1, len(dataset) // (global_batch * cfg.gradient_accumulation))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    tuned = accelerator.unwrap_model(unet)

    start = 0
    if checkpoint is not None:
        state = plan.state
        current = dict(tuned.named_parameters())
        with torch.no_grad():
            for name, tensor in state["tuner"].items():  # the weights first: restoring only the optimizer is a known bug
                current[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["step"]
    if start >= total_steps:
        raise UserError(f"--resume: the run already reached step {start} of {total_steps}; raise --max-steps to go on")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the first write: everything above failed without leaving anything behind
        for stale in plan.stale:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        with writing(run, "choose an --output where you can write"):
            run.mkdir(parents=True, exist_ok=True)
        record = {**dataclasses.asdict(cfg), "tuning": tuning.to_dict(), "attention_backend": backend,
                  "num_processes": accelerator.num_processes, "dataset_size": len(dataset), "total_steps": total_steps,
                  **{k: summary[k] for k in ("tuner_params", "trainable_params", "total_params")}}
        write_text_atomic(run / "config.json", json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()

    stream = SampleStream(dataset, cfg.seed)
    rank = accelerator.process_index

    def batches(step: int):
        """This process's micro-batches of one optimizer step: slices of the global batch in stream order."""
        for micro in range(cfg.gradient_accumulation):
            first = (step * cfg.gradient_accumulation + micro) * global_batch + rank * cfg.batch_size
            yield list(range(first, first + cfg.batch_size))

    loader = torch.utils.data.DataLoader(
        stream, batch_sampler=[b for s in range(start, total_steps) for b in batches(s)], num_workers=cfg.num_workers
    )
    encoders = Encoders(comps, weight_dtype, run / "cache.pt" if cfg.cache else None)
    writer = writer_class(str(run / "tensorboard")) if writer_class and accelerator.is_main_process else None

    metrics_path = run / "metrics.jsonl"
    history = [h for h in read_metrics(metrics_path) if h["step"] <= start]
    if accelerator.is_main_process:
        write_text_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    progress = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not accelerator.is_main_process)
    unet.train()
    iterator = iter(loader)
    started = time.time()
    last_checkpoint = checkpoint  # a resumed run's checkpoint is its last good one until it writes another
    corrupt = set()  # counted here, not in the dataset: DataLoader workers each hold their own copy of it
    try:  # the bar ends its line, so an error is printed on a line of its own
        for step in range(start, total_steps):
            tick = time.time()
            step_loss = 0.0
            for _ in range(cfg.gradient_accumulation):
                batch = next(iterator)
                for asked, skipped in zip(batch["index"].tolist(), batch["skipped"].tolist()):
                    corrupt.update((asked + k) % len(dataset) for k in range(skipped))
                with accelerator.accumulate(unet), accelerator.autocast():
                    loss = diffusion_loss(unet, encoders, batch, cfg, step, device)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / cfg.gradient_accumulation
            scheduler.step()
            if not math.isfinite(step_loss):
                kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
                if step == start:  # before any update the learning rate cannot be the cause
                    raise UserError(f"loss became {step_loss} at step {step + 1}, before any update; stopped ({kept}). "
                                    "The model, the tuner's weights or config (e.g. a non-finite scale) or the data give it")
                raise UserError(f"loss became {step_loss} at step {step + 1}; stopped ({kept}). Lower --learning-rate or use bf16/fp32")
            entry = {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                     "seconds_per_step": time.time() - tick, "peak_memory_mb": peak_memory_mb(device)}
            history.append(entry)
            if accelerator.is_main_process:
                with writing(metrics_path, disk_hint(last_checkpoint)), metrics_path.open("a") as log:
                    log.write(json.dumps(entry) + "\n")
                if writer:
                    for key in ("loss", "lr", "seconds_per_step"):
                        writer.add_scalar(key, entry[key], step + 1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{entry['lr']:.2e}")
                progress.update(1)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    last_checkpoint = save_checkpoint(run, step + 1, tuned, optimizer, scheduler, cfg, tuning, last_checkpoint)
                    encoders.save()
                if cfg.validation_prompt and cfg.validation_every and (step + 1) % cfg.validation_every == 0:
                    with writing(run / "validation", disk_hint(last_checkpoint)):
                        validation_image(comps, tuned, cfg, step + 1, run, device)
            accelerator.wait_for_everyone()
    finally:
        progress.close()

    from accelerate.utils import gather_object

    corrupt = set().union(*gather_object([corrupt]))
    results = {}
    if accelerator.is_main_process:
        if summary_line := dataset.corrupt_summary(corrupt):
            warn(summary_line)
        tuner_dir = run / "tuner"
        if tuner_dir.exists():  # a resumed run replaces the final tuner of its earlier, shorter end
            shutil.rmtree(tuner_dir)
        with writing(tuner_dir, disk_hint(last_checkpoint)):
            save_tuner(tuned, tuner_dir, extra={"trained_steps": total_steps, "data": cfg.data})
        encoders.save()
        with writing(run / "loss.png", disk_hint(last_checkpoint)):
            loss_curve_png([h["step"] for h in history], [h["loss"] for h in history], run / "loss.png")
        timed = [h["seconds_per_step"] for h in history[1:]] or [h["seconds_per_step"] for h in history]
        results = {
            "steps": total_steps, "final_loss": history[-1]["loss"] if history else None,
            "mean_loss_last_10": sum(h["loss"] for h in history[-10:]) / max(1, len(history[-10:])),
            "seconds_per_step": sum(timed) / max(1, len(timed)), "peak_memory_mb": max(h["peak_memory_mb"] for h in history),
            "wall_seconds": time.time() - started, "tuner_dir": str(tuner_dir), "attention_backend": backend,
            "num_processes": accelerator.num_processes,
            **{k: summary[k] for k in ("tuner_params", "trainable_params", "total_params")},
        }
        write_text_atomic(run / "results.json", json.dumps(results, indent=2) + "\n", disk_hint(last_checkpoint))
        if writer:
            writer.close()
    accelerator.wait_for_everyone()
    return results
