"""Fine-tuning a frozen SD UNet with any tuner: `train(cfg) -> result`, on accelerate (CPU, one or many GPUs).

Every random draw (data order, noise, timestep, VAE sample) is a pure function of the seed, the step and the
sample's position in the global batch, so a resumed run and a run split over N processes see the same numbers
as one uninterrupted process with the combined batch.
"""

import dataclasses
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from restune_sd.config import resolve_tuner
from restune_sd.errors import UserError

CHECKPOINTS = "checkpoints"


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
    cache: bool = False  # VAE latents and text embeddings, kept in RUN_DIR/cache.pt
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
        if self.batch_size < 1 or self.gradient_accumulation < 1 or self.epochs < 1:
            raise UserError("--batch-size, --gradient-accumulation and --epochs must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be at least 1")
        if self.cache and (self.random_flip or not self.center_crop):
            raise UserError("--cache stores one latent per image: it needs centre crops and no random flip")


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

    from restune_sd.models import model_kind

    if Path(model).exists() and model_kind(model) != "sd":
        raise UserError(f"{model} is not a diffusers Stable Diffusion pipeline folder (it has no model_index.json)")
    try:
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype).to(device),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype).to(device),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device),
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
        )
    except OSError as error:
        raise UserError(f"cannot load a Stable Diffusion pipeline from {model!r}: {str(error).splitlines()[0]}") from None


def locate_run(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a fresh run); reads only, never writes."""
    run = Path(cfg.output)
    if cfg.resume is None:
        if run.exists() and (not run.is_dir() or any(run.iterdir())):
            raise UserError(f"{run} already holds files: choose a new --output, or pass --resume latest to continue it")
        return run, None
    if cfg.resume == "latest":
        found = sorted((run / CHECKPOINTS).glob("step-*.pt")) if (run / CHECKPOINTS).is_dir() else []
        if not found:
            raise UserError(f"--resume latest: {run / CHECKPOINTS} holds no checkpoint to resume from")
        return run, found[-1]
    checkpoint = Path(cfg.resume)
    if not checkpoint.is_file():
        raise UserError(f"--resume {checkpoint}: no such checkpoint file (use latest, or a step-*.pt file)")
    return run, checkpoint


def check_resume_matches(run: Path, cfg: TrainConfig) -> None:
    saved_path = run / "config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    # The optimizer and scheduler state restored from the checkpoint would silently override these.
    for key in ("model", "data", "tuner", "batch_size", "gradient_accumulation", "seed", "learning_rate", "lr_scheduler",
                "warmup_steps", "weight_decay"):
        if saved.get(key) != getattr(cfg, key):
            raise UserError(f"--resume: this run was started with {key}={saved.get(key)!r}, not {getattr(cfg, key)!r}; "
                            "resume with the same settings or start a new --output")


def atomic_torch_save(obj, path: Path) -> None:
    """Write then rename, so a run killed mid-write leaves the previous file intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process


class Encoders:
    """The frozen VAE and text encoder, with optional caches so later epochs skip them."""

    def __init__(self, comps: Components, dtype, cache_file: Path | None):
        self.comps, self.dtype, self.cache_file = comps, dtype, cache_file
        self.latents = {} if cache_file else None  # dataset index -> (mean, std)
        self.texts = {} if cache_file else None  # caption -> embedding
        if cache_file and cache_file.is_file():
            saved = torch.load(cache_file, map_location="cpu", weights_only=True)
            self.latents, self.texts = saved["latents"], saved["texts"]

    def save(self) -> None:
        """Persist the caches (atomically) so a resumed run skips the frozen encoders too."""
        if self.cache_file:
            atomic_torch_save({"latents": self.latents, "texts": self.texts}, self.cache_file)

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
    mean, std = encoders.latent_moments(batch["pixel_values"], batch["index"].tolist(), device)
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


def save_checkpoint(run: Path, step: int, unet, optimizer, scheduler, keep: int) -> Path:
    folder = run / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    atomic_torch_save({"step": step, "tuner": tuner_state_dict(unet), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": rng_state()}, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep] if keep > 0 else []:
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


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training job; returns the results also written to RUN_DIR/results.json."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    from restune_sd.attention import set_attention_backend
    from restune_sd.datasets import build_dataset
    from restune_sd.evaluation.plots import loss_curve_png
    from restune_sd.inject import attach
    from restune_sd.io import save_tuner
    from restune_sd.models import native_resolution, pipeline_resolution, quiet_loading
    from restune_sd.summary import parameter_summary

    tuning = resolve_tuner(cfg.tuner, "unet")
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
    run, checkpoint = locate_run(cfg)  # every process checks before anything is written, so none waits on a failed one
    if checkpoint is not None:
        check_resume_matches(run, cfg)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)

    def data(resolution):
        return build_dataset(cfg.data, split=cfg.split, resolution=resolution, center_crop=cfg.center_crop,
                             random_flip=cfg.random_flip, caption_template=cfg.caption_template, seed=cfg.seed)

    # The data is checked before any model is loaded: a bad root fails in a second, not after minutes.
    resolution = cfg.resolution or pipeline_resolution(cfg.model)
    dataset = data(resolution) if resolution else None
    quiet_loading()
    comps = load_components(cfg.model, device, weight_dtype)
    if cfg.prediction_type:
        comps.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    cfg = dataclasses.replace(cfg, resolution=resolution or native_resolution(comps.unet.config, comps.vae.config))
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
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
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

    if accelerator.is_main_process:
        record = {**dataclasses.asdict(cfg), "tuning": tuning.to_dict(), "attention_backend": backend,
                  "num_processes": accelerator.num_processes, "dataset_size": len(dataset), "total_steps": total_steps,
                  **{k: summary[k] for k in ("tuner_params", "trainable_params", "total_params")}}
        (run / "config.json").write_text(json.dumps(record, indent=2) + "\n")

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
    writer = None
    if cfg.tensorboard and accelerator.is_main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(str(run / "tensorboard"))

    metrics_path = run / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    history = [h for h in history if h["step"] <= start]
    if accelerator.is_main_process:
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    progress = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not accelerator.is_main_process)
    unet.train()
    iterator = iter(loader)
    started = time.time()
    last_checkpoint = checkpoint  # a resumed run's checkpoint is its last good one until it writes another
    for step in range(start, total_steps):
        tick = time.time()
        step_loss = 0.0
        for _ in range(cfg.gradient_accumulation):
            batch = next(iterator)
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
            raise UserError(f"loss became {step_loss} at step {step + 1}; stopped ({kept}). Lower --learning-rate or use bf16/fp32")
        entry = {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                 "seconds_per_step": time.time() - tick, "peak_memory_mb": peak_memory_mb(device)}
        history.append(entry)
        if accelerator.is_main_process:
            with metrics_path.open("a") as log:
                log.write(json.dumps(entry) + "\n")
            if writer:
                for key in ("loss", "lr", "seconds_per_step"):
                    writer.add_scalar(key, entry[key], step + 1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{entry['lr']:.2e}")
            progress.update(1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                last_checkpoint = save_checkpoint(run, step + 1, tuned, optimizer, scheduler, cfg.keep_checkpoints)
                encoders.save()
            if cfg.validation_prompt and cfg.validation_every and (step + 1) % cfg.validation_every == 0:
                validation_image(comps, tuned, cfg, step + 1, run, device)
        accelerator.wait_for_everyone()
    progress.close()

    results = {}
    if accelerator.is_main_process:
        if dataset_corrupt := getattr(dataset, "corrupt_summary", lambda: None)():
            print(f"warning: {dataset_corrupt}")
        tuner_dir = run / "tuner"
        if tuner_dir.exists():  # a resumed run replaces the final tuner of its earlier, shorter end
            shutil.rmtree(tuner_dir)
        save_tuner(tuned, tuner_dir, extra={"trained_steps": total_steps, "data": cfg.data})
        encoders.save()
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
        (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if writer:
            writer.close()
    accelerator.wait_for_everyone()
    return results
