"""`restune-sd bench digits`: evidence on real images. The UCI handwritten digits (evaluation/digits_data.py) are
split by digit; a backbone is trained on digits 0-4 and every preset is then tuned on digits 5-9, for both backbones:

- vit (evaluation/digits_vit.py): top-1 on the held-out 5-9 images, mean and spread over seeds, with trainable
  parameters, peak memory and time;
- sd (evaluation/digits_sd.py): images sampled per digit, scored by a digit classifier trained on the real digits
  (conditional accuracy, and a Frechet distance in that classifier's feature space), with sample grids.

Each part writes into OUTPUT/<part>/ and returns its rows and a markdown table; this module runs the parts asked for
under one lock and writes OUTPUT/results.json and OUTPUT/results.md with the command that repeats the run.
"""

import importlib
import json
import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from restune_sd.errors import UserError
from restune_sd.files import write_text_atomic

PARTS = ("vit", "sd")
RESULT_FILES = ("results.json", "results.md")


@dataclass
class DigitsConfig:
    output: Path
    parts: tuple[str, ...] = PARTS
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    presets: tuple[str, ...] | None = None  # None: each part's own list
    quick: bool = False  # a few steps of everything: for tests, not for figures
    overwrite: bool = False
    extra: dict = field(default_factory=dict)  # part-specific settings, recorded with the results


def command_line(cfg: DigitsConfig) -> str:
    words = ["restune-sd", "bench", "digits", "--output", str(cfg.output), "--part", ",".join(cfg.parts),
             "--seeds", ",".join(map(str, cfg.seeds))]
    if cfg.presets:
        words += ["--tuners", ",".join(cfg.presets)]
    return shlex.join(words + (["--quick"] if cfg.quick else []))


def check(cfg: DigitsConfig) -> DigitsConfig:
    unknown = [part for part in cfg.parts if part not in PARTS]
    if unknown or not cfg.parts:
        raise UserError(f"--part must be a comma-separated list of {', '.join(PARTS)}, not {','.join(cfg.parts)!r}")
    if not cfg.seeds or any(seed < 0 for seed in cfg.seeds) or len(set(cfg.seeds)) < len(cfg.seeds):
        raise UserError(f"--seeds must be distinct whole numbers >= 0, not {','.join(map(str, cfg.seeds))!r}")
    taken = [name for name in RESULT_FILES if (cfg.output / name).exists()]
    if taken and not cfg.overwrite:
        raise UserError(f"{cfg.output / taken[0]} already exists: pass --overwrite to replace the results, or choose "
                        "another --output")
    try:
        import sklearn  # noqa: F401 (the digits ship inside scikit-learn)
    except ImportError:
        raise UserError("bench digits needs scikit-learn (it ships the digits): pip install scikit-learn") from None
    return cfg


def run_digits(cfg: DigitsConfig) -> dict:
    """Run every part asked for; write results.json and results.md into cfg.output."""
    from restune_sd.runfolder import FolderLock

    cfg = check(cfg)
    started = time.time()
    with FolderLock(cfg.output, "--output"):
        parts = {}
        for part in cfg.parts:
            module = importlib.import_module(f"restune_sd.evaluation.digits_{part}")
            parts[part] = module.run(cfg, cfg.output / part)
        result = {"command": command_line(cfg), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                  "seconds": round(time.time() - started, 1), "environment": environment(),
                  "settings": {k: v for k, v in asdict(cfg).items() if k not in ("output", "overwrite")},
                  "parts": {name: {k: v for k, v in value.items() if k != "markdown"} for name, value in parts.items()}}
        write_text_atomic(cfg.output / "results.json", json.dumps(result, indent=2, default=str) + "\n")
        write_text_atomic(cfg.output / "results.md", markdown(result, parts))
    return result


def environment() -> dict:
    import torch

    from restune_sd.evaluation.bench import cpu_name

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def markdown(result: dict, parts: dict) -> str:
    env = result["environment"]
    lines = ["# Digits benchmark (real images: scikit-learn's UCI handwritten digits)", "",
             f"Made with `{result['command']}` on {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, "
             f"{result['date_utc']} UTC, in {result['seconds'] / 60:.1f} min.", ""]
    for name, value in parts.items():
        lines += [value["markdown"].rstrip(), ""]
    return "\n".join(lines)
