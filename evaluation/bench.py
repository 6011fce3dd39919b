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
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from restune_sd.attention import resolve_backend
from restune_sd.bounds import MAX_RESOLUTION, require_number, require_resolution
from restune_sd.config import preset_names
from restune_sd.errors import UserError
from restune_sd.files import write_atomic, write_text_atomic
from restune_sd.models import ARCHITECTURES, model_kind, pipeline_resolution
from restune_sd.evaluation.bench_child import (BACKBONES, DTYPES, child_env, failure, measure, measure_cli,
                                               write_random_sd15_pipeline)

DEFAULT_MODELS = {"sd": "sd15", "vit": "vit-b16"}
DEFAULT_TUNERS = {"sd": ["full", "lora", "adapter", "prefix", "prompt", "res-tuning", "bypass"],
                  "vit": ["full", "linear", "lora", "adapter", "prefix", "prompt", "res-tuning", "bypass"]}
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


# ---- the parent: contenders, repeats, aggregation, files ---------------------------------------------------------


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


def spelled_out(cfg: BenchConfig, keys) -> list[str]:
    """`--key value` for each of `cfg`'s settings named in `keys`."""
    return [word for key in keys for word in (f"--{key.replace('_', '-')}", str(getattr(cfg, key)))]


def command_line(cfg: BenchConfig) -> str:
    """The `restune-sd bench` command that repeats this run, every setting spelled out."""
    words = ["restune-sd", "bench", cfg.kind, "--output", str(cfg.output), "--tuners", ",".join(cfg.tuners)]
    words += spelled_out(cfg, ("model", "resolution", "batch", "precision", "steps", "warmup", "repeats",
                               "sample_steps", "device", *(("attention",) if cfg.kind == "sd" else ())))
    return shlex.join(words + (["--through-cli"] if cfg.through_cli else []))


def environment(cfg: BenchConfig, command: str | None = None) -> dict:
    """The machine and the command (default: `command_line(cfg)`) that made a run's figures."""
    device = torch.device(cfg.device)
    return {"command": command or command_line(cfg), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "cpu": cpu_name(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512: bf16 speed differs
            "cpu_count": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
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
