"""The ViT part of `restune-sd bench digits`: the tiny ViT (restune_sd.tiny.TINY_VIT) trained whole on digits 0-4,
exported as a model folder (`restune-sd export --format vit-folder`), then every ViT preset tuned on digits 5-9 over
several seeds with `restune-sd classify`'s own code. Top-1 is the final model's on the held-out 5-9 images.

Memory is what a training forward keeps for backward (evaluation/memory.py, batch 64): on a CPU the process's peak RSS
is shared by every run it made, so it cannot be given per preset. Time is `classify`'s mean seconds per step.
"""

import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from restune_sd.errors import UserError
from restune_sd.evaluation import digits_data

# The pretraining and tuning recipes: VTAB-1K's optimiser (docs/method.md §4) over fewer epochs, since the digit sets
# are 627 training images each (10 steps of 64 an epoch) and the whole part must run in about ten minutes on 2 cores.
PRETRAIN = dict(epochs=30, learning_rate=1e-3, warmup_epochs=3)
TRANSFER = dict(epochs=30, learning_rate=1e-3, warmup_epochs=3)
QUICK = dict(max_steps=2, warmup_epochs=0)  # pipeline check only
BATCH = 64
THREADS = 1  # one core per run: the figures and the time column do not depend on what else the machine runs


def presets(cfg) -> list[str]:
    from restune_sd.config import preset_names

    return list(cfg.presets or preset_names("vit"))


def prepare(folder: Path, quick: bool = False, log=print) -> tuple[str, str, dict]:
    """The digit data as class folders, and the backbone: the tiny ViT trained whole on 0-4 and exported as a model
    folder. Returns (backbone folder, transfer data spec, the pretraining run's results); made once per folder."""
    from restune_sd.classify import ClassifyConfig, classify
    from restune_sd.export import export_vit_folder
    from restune_sd.tiny import TINY_VIT_RESOLUTION, write_tiny_vit

    data = folder / "data"
    if not (data / "transfer").is_dir():
        digits = digits_data.load()
        for name, keep in (("pretrain", digits_data.PRETRAIN_DIGITS), ("transfer", digits_data.TRANSFER_DIGITS)):
            train, test = digits_data.split(digits, keep)
            digits_data.write_classfolder(data / f".{name}", {"train": train, "test": test}, TINY_VIT_RESOLUTION)
            (data / f".{name}").rename(data / name)
    backbone = folder / "backbone"
    results_file = folder / "pretrain-run" / "results.json"
    if not (backbone / "config.json").is_file():
        log("digits vit: training the tiny ViT whole on digits 0-4")
        if not (folder / "random-vit").is_dir():
            write_tiny_vit(folder / "random-vit", seed=0)
        with one_thread():
            classify(ClassifyConfig(model=str(folder / "random-vit"), data=f"classfolder:{data / 'pretrain'}", tuner="full",
                                    output=str(folder / "pretrain-run"), batch_size=BATCH, report_to="none", seed=0,
                                    **(PRETRAIN | (QUICK if quick else {}))))
        export_vit_folder(folder / "pretrain-run", backbone)
    return str(backbone), f"classfolder:{data / 'transfer'}", json.loads(results_file.read_text())


class one_thread:
    """torch on THREADS threads inside the block, as it was after."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def tune(backbone: str, data: str, tuner: str, seed: int, output: Path, quick: bool = False, **settings) -> dict:
    """One `classify train` run of `tuner` (a preset or a config file) on the transfer digits; its results.json."""
    from restune_sd.classify import ClassifyConfig, classify

    recipe = TRANSFER | settings | (QUICK if quick else {})
    with one_thread():
        return classify(ClassifyConfig(model=backbone, data=data, tuner=tuner, output=str(output), batch_size=BATCH,
                                       seed=seed, report_to="none", **recipe))


def activation_mb(backbone: str, data: str, tuner: str) -> float:
    """Saved activations of one training forward of `tuner` on a batch of 64 transfer images (MB)."""
    from restune_sd.classify import labelled_model, normalisation
    from restune_sd.config import resolve_tuner
    from restune_sd.datasets import build_classification_dataset
    from restune_sd.evaluation.memory import saved_activation_bytes
    from restune_sd.inject import attach

    mean, std = normalisation(backbone)
    dataset = build_classification_dataset(data, split="train", resolution=32, mean=mean, std=std)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(BATCH)])
    model = attach(labelled_model(backbone, dataset.classes, "cpu"), resolve_tuner(tuner, "vit")).train()
    return saved_activation_bytes(lambda: model(pixel_values=pixels).logits, model) / 2**20


def summarise(name: str, runs: list[dict]) -> dict:
    top1 = [100 * run["top1"] for run in runs]
    first = runs[0]
    return {"preset": name, "top1_mean": round(statistics.mean(top1), 2),
            "top1_std": round(statistics.stdev(top1), 2) if len(top1) > 1 else 0.0,
            "top1_per_seed": [round(t, 2) for t in top1], "tuner_params": first["tuner_params"],
            "head_params": first["head_params"], "trainable_params": first["trainable_params"],
            "seconds_per_step": round(statistics.mean(run["seconds_per_step"] for run in runs), 4),
            "seconds_per_run": round(statistics.mean(run["wall_seconds"] for run in runs), 1)}


def run(cfg, folder: Path) -> dict:
    """Pretrain, export, tune every preset on every seed; the rows and the markdown section of results.md."""
    if folder.is_dir() and any(folder.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"{folder} holds an earlier run's files: pass --overwrite to run again, or choose another --output")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    backbone, data, pretrain = prepare(folder, cfg.quick)
    rows = []
    for name in presets(cfg):
        runs = []
        for seed in cfg.seeds:
            print(f"digits vit: {name}, seed {seed}", flush=True)
            runs.append(tune(backbone, data, name, seed, folder / "runs" / name / f"seed{seed}", cfg.quick))
        rows.append(summarise(name, runs) | {"activation_mb": round(activation_mb(backbone, data, name), 3)})
    recipe = TRANSFER | (QUICK if cfg.quick else {})
    result = {"rows": rows, "pretrain_top1_0_4": round(100 * pretrain["top1"], 2), "backbone": "restune_sd.tiny.TINY_VIT",
              "backbone_params": pretrain["total_params"],
              "transfer_recipe": recipe | {"batch_size": BATCH}, "pretrain_recipe": PRETRAIN | {"batch_size": BATCH},
              "seconds": round(time.time() - started, 1)}
    (folder / "rows.json").write_text(json.dumps(result, indent=2) + "\n")
    return result | {"markdown": markdown(result, cfg)}


def markdown(result: dict, cfg) -> str:
    rows = {row["preset"]: row for row in result["rows"]}
    lora = rows.get("lora")
    recipe = result["transfer_recipe"]
    length = f"{recipe['max_steps']} steps" if recipe.get("max_steps") else f"{recipe['epochs']} epochs"
    lines = ["## ViT: transfer from digits 0-4 to digits 5-9", "",
             f"The tiny ViT (4 layers of width 32, 8 px patches on 32 px images, {result['backbone_params']:,} parameters with its head) trained whole "
             f"on digits 0-4 ({result['pretrain_top1_0_4']:.1f}% top-1 on their held-out images), exported with "
             "`restune-sd export --format vit-folder`; every preset then tuned on digits 5-9 with `restune-sd classify` "
             f"({length}, batch {BATCH}, AdamW lr {recipe['learning_rate']:g}, cosine, {recipe['warmup_epochs']} warm-up "
             f"epochs, a new head), seeds {', '.join(map(str, cfg.seeds))}. Top-1 of the final model on the 269 held-out "
             "5-9 images, mean ± standard deviation over the seeds.", "",
             "| preset | top-1 % (mean ± sd) | Δ vs lora | tuner params | + head | activations kept (MB, batch 64) | s/step |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        delta = f"{row['top1_mean'] - lora['top1_mean']:+.1f}" if lora else "–"
        lines.append(f"| {row['preset']} | {row['top1_mean']:.1f} ± {row['top1_std']:.1f} | {delta} | "
                     f"{row['tuner_params']:,} | {row['head_params']:,} | {row['activation_mb']:.2f} | "
                     f"{row['seconds_per_step']:.3f} |")
    if cfg.quick:
        lines += ["", "--quick: a few steps of each run; these figures check the pipeline and mean nothing."]
    return "\n".join(lines) + "\n"

