"""`restune-sd bench`: trainable parameters, peak memory, seconds per optimizer step and sampling (SD) or inference
(ViT) speed of each tuner on one backbone, every contender in a fresh process of its own, with each figure's ratio to
LoRA's and to full fine-tuning's from the same run; written as results.json, results.md and chart.png.

A contender's process loads the frozen backbone, notes its memory, times sampling with the bare backbone, attaches
the tuner and runs warm-up and timed AdamW steps on random inputs of the right shapes (the library path), then times
sampling with the tuner. With `through_cli` every SD tuner is measured a second time through `restune-sd train` on a
full-size pipeline folder and a small generated data set, so the text encoder, VAE and data loading count too.
Repeats are interleaved (each round runs every contender once, in a rotated order) and the median is reported, so a
burst of background load lands on one round of every contender rather than on all rounds of one.
"""

import dataclasses
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from restune_sd.attention import resolve_backend
from restune_sd.bounds import MAX_RESOLUTION, require_number, require_resolution
from restune_sd.config import preset, preset_names
from restune_sd.errors import UserError
from restune_sd.files import write_atomic, write_text_atomic
from restune_sd.models import ARCHITECTURES, model_kind, pipeline_resolution

BACKBONES = {"sd": "unet", "vit": "vit"}
DEFAULT_MODELS = {"sd": "sd15", "vit": "vit-b16"}
DEFAULT_TUNERS = {"sd": ["full", "lora", "adapter", "prefix", "prompt", "res-tuning", "bypass"],
                  "vit": ["full", "linear", "lora", "adapter", "prefix", "prompt", "res-tuning", "bypass"]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULT_FILES = ("results.json", "results.md", "chart.png")
CLI_SUFFIX = " (train CLI)"
# docs/method.md §3: training memory (GB) and hours per epoch of the paper's rows (SD v1.5 on COCO2017; ViT-B/16).
PAPER = {
    "sd": {"memory_gb": {"full": 72.77, "lora": 61.03, "adapter": 54.30, "prefix": 64.91, "prompt": 63.70,
                         "res-tuning": 54.49, "bypass": 21.35},
           "hours_per_epoch": {"full": 1.98, "lora": 1.42, "adapter": 1.30, "prefix": 2.20, "prompt": 2.17,
                               "res-tuning": 1.38, "bypass": 0.82}},
    "vit": {"memory_gb": {"full": 9.40, "linear": 3.09, "lora": 6.88, "res-tuning": 8.95, "bypass": 4.73},
            "hours_per_epoch": {}},
}
# The figures whose ratios to LoRA's and to full's are reported.
RATIO_FIGURES = ("trainable_params", "peak_mb", "above_weights_mb", "saved_activations_mb", "step_seconds",
                 "sample_seconds_per_image", "images_per_second")


@dataclass
class BenchConfig:
    """What `restune-sd bench` measures, and where it writes."""

    kind: str = field(metadata={"help": "sd (a UNet) or vit (a ViT classifier)"})
    output: Path = field(metadata={"help": "new folder for results.json, results.md and chart.png"})
    tuners: list[str] | None = field(default=None, metadata={"help": "presets to measure (default: DEFAULT_TUNERS)"})
    model: str | None = field(default=None, metadata={"help": "sd15 / vit-b16 (random weights) or a model folder"})
    resolution: int | None = field(default=None, metadata={"help": "image side (default: the model's own)"})
    batch: int = field(default=1, metadata={"help": "images per step"})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 (CUDA only)"})
    steps: int = field(default=3, metadata={"help": "timed optimizer steps per contender and repeat"})
    warmup: int = field(default=1, metadata={"help": "untimed optimizer steps before them"})
    repeats: int = field(default=1, metadata={"help": "interleaved rounds; figures are medians over them"})
    sample_steps: int = field(default=4, metadata={"help": "SD: denoising steps timed; ViT: inference batches timed"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})
    attention: str = field(default="auto", metadata={"help": "SD: auto, xformers or sdpa (auto: xformers where usable)"})
    through_cli: bool = field(default=False, metadata={"help": "SD: also measure each tuner through `restune-sd train`"})
    overwrite: bool = field(default=False, metadata={"help": "replace results already in the output folder"})

    def __post_init__(self):
        if self.kind not in BACKBONES:
            raise UserError(f"unknown backbone kind {self.kind!r}: use sd or vit")
        self.output = Path(self.output)
        self.model = self.model or DEFAULT_MODELS[self.kind]
        self.tuners = list(self.tuners or DEFAULT_TUNERS[self.kind])
        known = preset_names(BACKBONES[self.kind])
        unknown = [t for t in self.tuners if t not in known]
        if unknown or not self.tuners or len(set(self.tuners)) < len(self.tuners):
            raise UserError(f"--tuners must name distinct presets of {', '.join(known)}, not {', '.join(self.tuners)}")
        if self.precision not in DTYPES:
            raise UserError(f"unknown --precision {self.precision!r}: use fp32, bf16 or fp16")
        for name, minimum in (("batch", 1), ("steps", 1), ("warmup", 0), ("repeats", 1), ("sample_steps", 1)):
            require_number(f"--{name.replace('_', '-')}", getattr(self, name), minimum=minimum, maximum=10_000, integer=True)
        if self.through_cli and self.kind != "sd":
            raise UserError("--through-cli measures `restune-sd train`, which trains SD: drop it for vit")
        if self.attention != "auto" and self.kind != "sd":
            raise UserError("--attention chooses the UNet's attention kernels: drop it for vit")


def check(cfg: BenchConfig) -> BenchConfig:
    """Everything about `cfg` that can be checked before a process starts: model, device, resolution, output folder."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # an unknown name, or CUDA absent from this machine or build
        raise UserError(f"cannot use device '{device}' ({str(error).strip().splitlines()[0]}); pass --device cpu "
                        "or a device this machine has") from None
    if cfg.precision == "fp16" and torch.device(device).type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (CPU kernels for fp16 are slow or missing); use bf16 or fp32")
    # An unusable xformers fails here, in one line, not in every child.
    attention = resolve_backend(cfg.attention) if cfg.kind == "sd" else cfg.attention
    model = model_spec(cfg)
    resolution = cfg.resolution or native_side(cfg.kind, model)
    if cfg.kind == "sd":
        require_resolution("--resolution", resolution, 8)
    else:
        require_number("--resolution", resolution, minimum=16, maximum=MAX_RESOLUTION, integer=True)
    if cfg.output.exists() and not cfg.output.is_dir():
        raise UserError(f"--output {cfg.output} is a file: pass a folder")
    held = [name for name in RESULT_FILES if (cfg.output / name).exists()]
    if held and not cfg.overwrite:
        raise UserError(f"{cfg.output} already holds {', '.join(held)}: pass --overwrite, or another --output")
    return dataclasses.replace(cfg, device=device, model=model, resolution=resolution, attention=attention)


def model_spec(cfg: BenchConfig) -> str:
    """The model as children load it: an architecture name, or a folder of the right kind (made absolute)."""
    if cfg.model in ARCHITECTURES:
        if cfg.model != DEFAULT_MODELS[cfg.kind]:
            raise UserError(f"{cfg.model} is not a{'n SD' if cfg.kind == 'sd' else ' ViT'} backbone: use "
                            f"{DEFAULT_MODELS[cfg.kind]} or a model folder")
        return cfg.model
    path = Path(cfg.model).expanduser()
    if not path.is_dir():
        raise UserError(f"--model {cfg.model} is neither {DEFAULT_MODELS[cfg.kind]} nor an existing model folder")
    wanted = ("sd", "unet") if cfg.kind == "sd" else ("vit",)
    if model_kind(path) not in wanted:
        raise UserError(f"{path} is not a{' Stable Diffusion' if cfg.kind == 'sd' else ' ViT'} model folder")
    if cfg.through_cli and model_kind(path) != "sd":
        raise UserError(f"--through-cli needs a whole SD pipeline folder (model_index.json), and {path} is a bare UNet")
    return str(path.resolve())


def native_side(kind: str, model: str) -> int:
    """The model's own image side: 512 for SD v1.5, 224 for ViT-B/16, or what a folder's configs say."""
    if model in ARCHITECTURES:
        return 512 if kind == "sd" else 224
    if kind == "vit":
        return json.loads((Path(model) / "config.json").read_text())["image_size"]
    if model_kind(model) == "sd":
        return pipeline_resolution(model)
    return json.loads((Path(model) / "config.json").read_text())["sample_size"] * 8


# ---- one contender, in its own process ------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak(device: torch.device) -> None:
    """Start counting the peak afresh: CUDA's allocator statistics, or Linux's high-water mark of resident memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
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


# ---- the parent: contenders, repeats, aggregation, files ---------------------------------------------------------


def child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def failure(finished: subprocess.CompletedProcess) -> str:
    """One line saying why a child process failed."""
    if finished.returncode < 0:
        return f"killed by signal {-finished.returncode}" + (" (likely out of memory)" if finished.returncode == -9 else "")
    lines = [line for line in finished.stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {finished.returncode}"


def run_child(spec: dict) -> dict:
    """`measure(spec)` in a fresh Python process; its one JSON line, or the reason it failed."""
    finished = subprocess.run([sys.executable, "-m", "restune_sd.evaluation.bench", "child", json.dumps(spec)],
                              capture_output=True, text=True, env=child_env())
    if finished.returncode:
        return {"error": failure(finished)}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def contenders(cfg: BenchConfig) -> list[str]:
    return cfg.tuners + ([t + CLI_SUFFIX for t in cfg.tuners] if cfg.through_cli else [])


def run_bench(cfg: BenchConfig) -> dict:
    """Measure every contender `cfg.repeats` times, interleaved; write the result files into `cfg.output`."""
    cfg = check(cfg)
    names = contenders(cfg)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="restune-bench-") as scratch:
        scratch = Path(scratch)
        pipeline, data = cli_inputs(cfg, scratch) if cfg.through_cli else (None, None)
        with tqdm(total=cfg.repeats * len(names), desc=f"bench {cfg.kind}", unit="run") as progress:
            for round_ in range(cfg.repeats):
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    progress.set_postfix_str(name)
                    spec = child_spec(cfg, name.removesuffix(CLI_SUFFIX))
                    if name.endswith(CLI_SUFFIX):
                        run = scratch / f"run-{round_}-{spec['tuner']}"
                        runs[name].append(measure_cli(spec, pipeline, data, run))
                    else:
                        runs[name].append(run_child(spec))
                    progress.update()
    rows = add_ratios([aggregate(name, runs[name]) for name in names])
    result = {"environment": environment(cfg), "settings": settings(cfg), "paper": PAPER[cfg.kind],
              "rows": rows}
    write_results(cfg, result)
    return result


def child_spec(cfg: BenchConfig, tuner: str) -> dict:
    keys = ("kind", "model", "resolution", "batch", "precision", "steps", "warmup", "sample_steps", "device",
            "attention")
    return {"tuner": tuner, **{key: getattr(cfg, key) for key in keys}}


def cli_inputs(cfg: BenchConfig, scratch: Path) -> tuple[Path, Path]:
    """The pipeline folder `train` loads (a random full-size SD v1.5 one for sd15) and a small captioned data set."""
    from restune_sd.datasets.synthetic import make_synthetic

    pipeline = Path(cfg.model)
    if cfg.model == "sd15":
        pipeline = scratch / "sd15-random"
        print("writing a random SD v1.5 pipeline (UNet, VAE, text encoder) for --through-cli", file=sys.stderr, flush=True)
        finished = subprocess.run([sys.executable, "-m", "restune_sd.evaluation.bench", "pipeline", str(pipeline)],
                                  capture_output=True, text=True, env=child_env())
        if finished.returncode:
            raise UserError(f"cannot write the random SD v1.5 pipeline for --through-cli ({failure(finished)})")
    per_class = max(2, -(-cfg.batch * (cfg.warmup + cfg.steps) // 2))
    data = make_synthetic("folder", scratch / "data", num_classes=2, images_per_class=per_class, size=cfg.resolution)
    return pipeline, data


def aggregate(name: str, runs: list[dict]) -> dict:
    """Medians over the repeats that succeeded; the step time's spread over every timed step of them."""
    good = [run for run in runs if "error" not in run]
    row = {"contender": name, "repeats": len(good)}
    if not good:
        return {**row, "error": runs[0]["error"]}
    for key in sorted({key for run in good for key in run} - {"step_seconds_all", "trainable_params"}):
        values = [run[key] for run in good if run.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["trainable_params"] = good[0]["trainable_params"]
    steps = [s for run in good for s in run["step_seconds_all"]]
    row["step_seconds"] = statistics.median(statistics.median(run["step_seconds_all"]) for run in good)
    row["step_seconds_min"], row["step_seconds_max"] = min(steps), max(steps)
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each figure divided by LoRA's and by full's on the same path (library, or train CLI)."""
    by_name = {row["contender"]: row for row in rows}
    for row in rows:
        suffix = CLI_SUFFIX if row["contender"].endswith(CLI_SUFFIX) else ""
        for base in ("lora", "full"):
            reference = by_name.get(base + suffix, {})
            row[f"ratio_to_{base}"] = {key: row[key] / reference[key] for key in RATIO_FIGURES
                                       if row.get(key) is not None and reference.get(key)}
    return rows


def command_line(cfg: BenchConfig) -> str:
    """The `restune-sd bench` command that repeats this run, every setting spelled out."""
    words = ["restune-sd", "bench", cfg.kind, "--output", str(cfg.output), "--tuners", ",".join(cfg.tuners)]
    for key in ("model", "resolution", "batch", "precision", "steps", "warmup", "repeats", "sample_steps", "device",
                *(("attention",) if cfg.kind == "sd" else ())):
        words += [f"--{key.replace('_', '-')}", str(getattr(cfg, key))]
    return shlex.join(words + (["--through-cli"] if cfg.through_cli else []))


def environment(cfg: BenchConfig) -> dict:
    device = torch.device(cfg.device)
    return {"command": command_line(cfg), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings(cfg: BenchConfig) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in dataclasses.asdict(cfg).items()
            if key not in ("output", "overwrite")}


def write_results(cfg: BenchConfig, result: dict) -> None:
    from restune_sd.evaluation.bench_report import chart_png, markdown

    cfg.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.output / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(cfg.output / "results.md", markdown(result))
    write_atomic(cfg.output / "chart.png", lambda tmp: chart_png(result, tmp))


def main(argv: list[str]) -> None:
    """`child SPEC_JSON`: measure one contender and print one JSON line; `pipeline PATH`: write the random SD v1.5."""
    if argv[0] == "child":
        print(json.dumps(measure(json.loads(argv[1]))), flush=True)
    elif argv[0] == "pipeline":
        write_random_sd15_pipeline(argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
