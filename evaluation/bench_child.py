"""One `restune-sd bench` contender, measured in a process of its own (evaluation/bench.py starts it): the frozen
backbone's memory, the bare and tuned sampling speed, the AdamW steps on random inputs of the backbone's shapes, and
the same tuner through `restune-sd train` on a full-size random SD v1.5 pipeline folder."""

import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from restune_sd.config import preset

BACKBONES = {"sd": "unet", "vit": "vit"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- one contender, in its own process ------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_freed_heap() -> None:
    """Hand the C heap's freed but retained pages back to the system (glibc's malloc_trim), so that what an earlier
    phase freed (a sampling loop's activations) does not count in the resident peak of the next; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak(device: torch.device) -> None:
    """Start counting the peak afresh: CUDA's allocator statistics, or Linux's high-water mark of resident memory
    (after the heap's freed pages are returned, so the count starts from what is live)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_heap()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM, which getrusage's ru_maxrss reports
    except OSError:  # not Linux, or not allowed: the peak then also covers loading the weights
        pass


def memory_mb(device: torch.device, peak: bool) -> float:
    """Peak (or current) memory: CUDA allocations, or resident memory of this process on CPU."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak else rss_mb()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Workload:
    """Random inputs of a backbone's shapes, its training loss, and its timed sampling (SD) or inference (ViT)."""

    def __init__(self, kind: str, model, spec: dict, device: torch.device, dtype: torch.dtype):
        self.kind, self.device, self.dtype, self.spec = kind, device, dtype, spec
        g = torch.Generator().manual_seed(0)
        batch, side = spec["batch"], spec["resolution"]
        if kind == "sd":
            latent, width = side // 8, model.config.cross_attention_dim
            self.latents = torch.randn(batch, model.config.in_channels, latent, latent, generator=g).to(device)
            self.noise = torch.randn(self.latents.shape, generator=g).to(device)
            self.context = torch.randn(batch, 77, width, generator=g).to(device)
            self.timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
        else:
            self.pixels = torch.randn(batch, 3, side, side, generator=g).to(device)
            self.labels = torch.randint(0, model.config.num_labels, (batch,), generator=g).to(device)
            self.resized = side != model.config.image_size

    def autocast(self):
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32)

    def forward(self, model, batch_of=None):
        if self.kind == "sd":
            latents, timesteps, context = batch_of or (self.latents, self.timesteps, self.context)
            return model(latents, timesteps, context).sample.float()
        return model(pixel_values=self.pixels, interpolate_pos_encoding=self.resized).logits.float()

    def loss(self, model) -> torch.Tensor:
        with self.autocast():
            output = self.forward(model)
        if self.kind == "sd":
            return F.mse_loss(output, self.noise)
        return F.cross_entropy(output, self.labels)

    @torch.no_grad()
    def speed(self, model) -> float:
        """SD: seconds per image of a DDIM loop with guidance; ViT: inference images per second (one warm-up call)."""
        with self.autocast():
            self.forward(model)
            synchronize(self.device)
            start = time.perf_counter()
            if self.kind == "vit":
                for _ in range(self.spec["sample_steps"]):
                    self.forward(model)
                synchronize(self.device)
                return self.spec["sample_steps"] * len(self.pixels) / (time.perf_counter() - start)
            self.denoise(model)
        synchronize(self.device)
        return (time.perf_counter() - start) / len(self.latents)

    def denoise(self, model) -> torch.Tensor:
        """`sample_steps` DDIM steps at guidance 7.5 (unconditional and conditional halves in one batch)."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        scheduler.set_timesteps(self.spec["sample_steps"])
        latents, context = self.noise, torch.cat([torch.zeros_like(self.context), self.context])
        for t in scheduler.timesteps:
            timesteps = torch.full((2 * len(latents),), int(t), device=self.device)
            uncond, cond = self.forward(model, (torch.cat([latents, latents]), timesteps, context)).chunk(2)
            latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
        return latents


def load_backbone(kind: str, model: str, device: torch.device):
    from restune_sd.models import load_unet, load_vit, quiet_loading

    quiet_loading()
    torch.manual_seed(0)  # the same random weights in every contender's process
    return (load_unet(model, device=str(device)) if kind == "sd" else load_vit(model, device=str(device))).eval()


def measure(spec: dict) -> dict:
    """One contender's figures (runs in a fresh process: peak memory is this process's)."""
    from restune_sd.evaluation.memory import saved_activation_bytes
    from restune_sd.inject import attach
    from restune_sd.loop import keep_trainables_fp32
    from restune_sd.summary import parameter_summary

    from restune_sd.attention import set_attention_backend

    device, dtype, kind = torch.device(spec["device"]), DTYPES[spec["precision"]], spec["kind"]
    tuning = preset(spec["tuner"], BACKBONES[kind])
    model = load_backbone(kind, spec["model"], device)
    if dtype != torch.float32 and not tuning.full:
        model.to(dtype)  # frozen weights in the compute precision, as `train` keeps them
    if kind == "sd":
        set_attention_backend(model, spec["attention"])
    workload = Workload(kind, model, spec, device, dtype)
    release_freed_heap()  # what loading freed is not part of the weights
    weights_mb = memory_mb(device, peak=False)
    reset_peak(device)
    with torch.no_grad(), workload.autocast():  # the floor of a bypass step: one frozen forward under no autograd
        workload.forward(model)
    frozen_forward_mb = memory_mb(device, peak=True) - weights_mb
    bare_speed = workload.speed(model)

    attach(model, tuning)
    keep_trainables_fp32(model, tuning, dtype)
    if kind == "sd":
        set_attention_backend(model, spec["attention"])  # the tuner's own processors too
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    model.train()
    reset_peak(device)
    seconds = [optimizer_step(model, workload, optimizer) for _ in range(spec["warmup"] + spec["steps"])]
    peak_mb = memory_mb(device, peak=True)
    del optimizer  # its state (twice the trainable weights for full) is not part of sampling
    model.eval()
    speed = workload.speed(model)
    activations = saved_activation_bytes(lambda: workload.loss(model), model) / 2**20
    figures = {"trainable_params": parameter_summary(model)["trainable_params"], "weights_mb": weights_mb,
               "peak_mb": peak_mb, "above_weights_mb": peak_mb - weights_mb, "saved_activations_mb": activations,
               "frozen_forward_mb": frozen_forward_mb,
               "step_seconds_all": seconds[spec["warmup"]:]}
    speed_key = "sample_seconds_per_image" if kind == "sd" else "images_per_second"
    return {**figures, speed_key: speed, f"bare_{speed_key}": bare_speed}


def optimizer_step(model, workload: Workload, optimizer) -> float:
    """Seconds of one step: forward, loss, backward, AdamW."""
    synchronize(workload.device)
    start = time.perf_counter()
    workload.loss(model).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(workload.device)
    return time.perf_counter() - start


# ---- the `restune-sd train` path ---------------------------------------------------------------------------------


def write_random_sd15_pipeline(path) -> Path:
    """A diffusers SD pipeline folder at SD v1.5 sizes with random weights: the tiny pipeline's tokenizer and
    scheduler, with a UNet, VAE and CLIP text encoder of SD v1.5's configurations (nothing is downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from restune_sd.models import SD15_UNET
    from restune_sd.tiny import write_tiny_sd

    path = write_tiny_sd(path)
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    tiny_text = json.loads((path / "text_encoder" / "config.json").read_text())
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408, projection_dim=768,
                          **{key: tiny_text[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
    torch.manual_seed(0)
    for part, module in (("unet", UNet2DConditionModel(**SD15_UNET)), ("vae", AutoencoderKL(**vae)),
                         ("text_encoder", CLIPTextModel(text))):
        module.save_pretrained(path / part, safe_serialization=True)
        del module
    return path


def measure_cli(spec: dict, pipeline: Path, data: Path, run: Path) -> dict:
    """One tuner through `restune-sd train`: trainable parameters, peak memory and seconds per step from its files."""
    command = [sys.executable, "-m", "restune_sd.cli.main", "train", "--model", str(pipeline), "--data", f"folder:{data}",
               "--tuner", spec["tuner"], "--output", str(run), "--max-steps", str(spec["warmup"] + spec["steps"]),
               "--resolution", str(spec["resolution"]), "--batch-size", str(spec["batch"]), "--report-to", "none",
               "--mixed-precision", {"fp32": "no"}.get(spec["precision"], spec["precision"]),
               "--attention", spec["attention"]]
    finished = subprocess.run(command, capture_output=True, text=True, env=child_env())
    if finished.returncode:
        return {"error": failure(finished)}
    results = json.loads((run / "results.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"trainable_params": results["trainable_params"], "peak_mb": results["peak_memory_mb"],
            "step_seconds_all": [h["seconds_per_step"] for h in history[spec["warmup"]:]]}


def child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def failure(finished: subprocess.CompletedProcess) -> str:
    """One line saying why a child process failed."""
    if finished.returncode < 0:
        return f"killed by signal {-finished.returncode}" + (" (likely out of memory)" if finished.returncode == -9 else "")
    lines = [line for line in finished.stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {finished.returncode}"
