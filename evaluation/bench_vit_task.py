"""`restune-sd bench vit --task`: the wall time of a whole VTAB-1K-sized task (1,000 random 224 px images, 100 epochs,
batch 64, ViT-B/16 with random weights) through `classify train`: bypass on cached taps against LoRA, and the bypass
running the backbone at every step. Unless --whole, runs that run the backbone are timed over a few steps and their
whole task extrapolated (steps x seconds per step); the cached bypass is always run whole, taps included.
"""

import json
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from restune_sd.bounds import require_number
from restune_sd.errors import UserError
from restune_sd.files import write_text_atomic

TASK = dict(images=1000, classes=10, epochs=100, batch=64, resolution=224)  # VTAB-1K's train800val200 and protocol
HELD_OUT = 2  # images per class in val/ and test/: the final top-1 is not part of the figure
CONTENDERS = {"bypass, cached taps": dict(tuner="bypass", cache_taps="yes"),
              "bypass, backbone every step": dict(tuner="bypass", cache_taps="no"),
              "lora": dict(tuner="lora", cache_taps="no")}
RESULT_FILES = ("results.json", "results.md")


@dataclass
class TaskBenchConfig:
    """What `bench vit --task` runs, and where it writes."""

    output: Path = field(metadata={"help": "folder for results.json, results.md, the data and the runs"})
    steps: int = field(default=3, metadata={"help": "timed steps of each run that runs the backbone (without --whole)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps before them"})
    micro_batch: int = field(default=64, metadata={"help": "images per forward of the runs that run the backbone; "
                                                           "gradient accumulation makes up the batch of 64"})
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (--mixed-precision)"})
    whole: bool = field(default=False, metadata={"help": "run every contender's whole task (hours for LoRA on a CPU)"})
    overwrite: bool = field(default=False, metadata={"help": "replace results already in the output folder"})
    model: str = field(default="vit-b16", metadata={"help": "the ViT (tests: a tiny one's folder)"})

    def __post_init__(self):
        self.output = Path(self.output)
        require_number("--steps", self.steps, minimum=1, maximum=10_000, integer=True)
        require_number("--warmup", self.warmup, minimum=0, maximum=10_000, integer=True)
        require_number("--micro-batch", self.micro_batch, minimum=1, maximum=TASK["batch"], integer=True)
        if TASK["batch"] % self.micro_batch:
            raise UserError(f"--micro-batch {self.micro_batch} does not divide the task's batch of {TASK['batch']}: "
                            "use 1, 2, 4, 8, 16, 32 or 64")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"unknown --precision {self.precision!r} for --task: use fp32 or bf16")
        held = [name for name in (*RESULT_FILES, "runs") if (self.output / name).exists()]
        if held and not self.overwrite:
            raise UserError(f"{self.output} already holds {', '.join(held)}: pass --overwrite, or another --output")


def write_random_images(root: Path) -> Path:
    """A class-folder set of random-noise images: TASK's training images, HELD_OUT per class in val/ and test/."""
    rng = np.random.default_rng(0)
    side, classes = TASK["resolution"], TASK["classes"]
    for split, count in (("train", TASK["images"]), ("val", HELD_OUT * classes), ("test", HELD_OUT * classes)):
        for i in range(count):
            folder = root / split / f"class_{i % classes}"
            if not (folder / f"{i}.png").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def task_steps() -> int:
    return TASK["epochs"] * (TASK["images"] // TASK["batch"])  # as `classify train` counts an epoch's steps


def time_contender(cfg: TaskBenchConfig, name: str, data: Path) -> dict:
    """One contender through `classify train`: measured whole, or over warm-up + timed steps and extrapolated."""
    from restune_sd.classify import ClassifyConfig, classify

    settings = CONTENDERS[name]
    whole = cfg.whole or settings["cache_taps"] == "yes"
    micro = TASK["batch"] if settings["cache_taps"] == "yes" else cfg.micro_batch
    run = cfg.output / "runs" / name.replace(", ", "-").replace(" ", "-")
    started = time.time()
    results = classify(ClassifyConfig(
        model=cfg.model, data=f"classfolder:{data}", output=str(run), epochs=TASK["epochs"],
        max_steps=None if whole else cfg.warmup + cfg.steps, batch_size=micro,
        gradient_accumulation=TASK["batch"] // micro, mixed_precision="no" if cfg.precision == "fp32" else "bf16",
        eval_batch_size=TASK["batch"], report_to="none", **settings))
    process_seconds = time.time() - started
    per_step = [json.loads(line)["seconds_per_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = per_step if whole else per_step[cfg.warmup:]
    taps = results.get("taps_seconds", 0.0)
    row = {"contender": name, "measured": "whole task" if whole else f"{len(timed)} steps", "steps_timed": len(timed),
           "seconds_per_step": statistics.fmean(timed), "taps_seconds": taps, "task_steps": task_steps(),
           "process_seconds": process_seconds}
    # Whole: the step loop as timed plus the taps; else the timed steps' mean times the task's steps. Loading the model
    # and the final top-1 are left out of both (the same for every contender).
    row["task_seconds"] = taps + (results["wall_seconds"] if whole else row["seconds_per_step"] * task_steps())
    row["extrapolated"] = not whole
    return row


def run_task_bench(cfg: TaskBenchConfig) -> dict:
    import torch

    from restune_sd.evaluation.bench import cpu_name

    if cfg.overwrite:
        shutil.rmtree(cfg.output / "runs", ignore_errors=True)  # the earlier bench's runs: each run needs a new folder
    data = write_random_images(cfg.output / "data")
    rows = [time_contender(cfg, name, data) for name in CONTENDERS]
    lora = next(row for row in rows if row["contender"] == "lora")["task_seconds"]
    for row in rows:
        row["ratio_to_lora"] = row["task_seconds"] / lora
    result = {"command": command_line(cfg), "task": TASK, "rows": rows, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__}
    cfg.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.output / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(cfg.output / "results.md", markdown(result))
    return result


def command_line(cfg: TaskBenchConfig) -> str:
    words = ["restune-sd", "bench", "vit", "--task", "--output", str(cfg.output), "--steps", str(cfg.steps),
             "--warmup", str(cfg.warmup), "--micro-batch", str(cfg.micro_batch), "--precision", cfg.precision]
    return shlex.join(words + (["--whole"] if cfg.whole else []))


def markdown(result: dict) -> str:
    task = result["task"]
    lines = [f"Whole VTAB-1K-sized task: {task['images']} random {task['resolution']} px images, {task['epochs']} epochs, "
             f"batch {task['batch']} ({result['rows'][0]['task_steps']} steps), ViT-B/16 with random weights, "
             f"`classify train`; {result['gpu'] or result['cpu']}, {result['threads']} threads.", "",
             "| contender | timed | s/step | taps, once (s) | whole task (s) | whole task is | ratio to LoRA |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        how = "extrapolated" if row["extrapolated"] else "measured"
        taps = f"{row['taps_seconds']:.1f}" if row["taps_seconds"] else "-"
        lines.append(f"| {row['contender']} | {row['measured']} | {row['seconds_per_step']:.3f} | {taps} "
                     f"| {row['task_seconds']:.0f} ({row['task_seconds'] / 3600:.2f} h) | {how} "
                     f"| {row['ratio_to_lora']:.4f} |")
    lines += ["", "Extrapolated: the mean of the timed steps (after the warm-up) times the task's steps. Measured: the "
              "step loop as run, plus the one-off tap computation. Loading the model and the final top-1 are left out "
              "of every row.", "", f"`{result['command']}`"]
    return "\n".join(lines) + "\n"
