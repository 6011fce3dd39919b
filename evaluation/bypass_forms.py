"""Train the two bypass ladder forms side by side on the tiny SD model and the tiny ViT: same data, steps and seeds.

Each tiny backbone is first fully trained on half of the synthetic classes (a stand-in for pretraining, so that the
frozen model's output means something), then both forms tune it on the other half.

`python -m restune_sd.evaluation.bypass_forms --out DIR` writes `bypass_forms.json` (per form and seed: the loss
curve, the mean loss of the last steps, and ViT test accuracy) and `bypass_forms.png` (mean curves per form).
The README's choice of the default form (`BypassSpec.form`) comes from this run.
"""

import argparse
import json
import random
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from restune_sd.config import BYPASS_FORMS, TuningConfig, preset

VIT_CLASSES = 12


def class_images(count: int, seed: int, classes: range, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images of the synthetic data sets' `classes` (a colour and a shape each, at a random place and size)."""
    from restune_sd.datasets.synthetic import draw

    rng = random.Random(seed)
    labels = [rng.choice(classes) for _ in range(count)]
    pixels = [np.asarray(draw(k, rng, size).resize((size, size)), dtype=np.float32) for k in labels]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1, torch.tensor(labels)


def split_folder(root: Path, parts: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Copy a synthetic `folder:` data set into one folder per part, keeping the images whose caption names a colour."""
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    specs = {}
    for part, colours in parts.items():
        folder = root.parent / f"{root.name}-{part}"
        folder.mkdir(exist_ok=True)
        kept = [line for line in lines if any(c in line.get("text", line.get("caption", "")) for c in colours)]
        for line in kept:
            shutil.copy(root / line["file_name"], folder / line["file_name"])
        (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in kept))
        specs[part] = f"folder:{folder}"
    return specs


def pretrained_sd(out: Path, steps: int, data: str) -> str:
    """The tiny SD pipeline with its UNet fully trained for `steps` on `data`: the 'pretrained' model the forms tune."""
    from restune_sd.io import load_tuner
    from restune_sd.models import load_unet
    from restune_sd.tiny import write_tiny_sd
    from restune_sd.train import TrainConfig, train

    tiny = write_tiny_sd(out / "tiny-sd")
    train(TrainConfig(model=str(tiny), data=data, tuner="full", output=str(out / "pretrain"), max_steps=steps,
                      batch_size=4, learning_rate=1e-3, seed=10_000))
    trained = load_tuner(load_unet(str(tiny)), out / "pretrain")
    plain = load_unet(str(tiny))
    plain.load_state_dict(trained.state_dict())
    shutil.copytree(tiny, out / "tiny-sd-pretrained")
    shutil.rmtree(out / "tiny-sd-pretrained" / "unet")
    plain.save_pretrained(out / "tiny-sd-pretrained" / "unet")
    return str(out / "tiny-sd-pretrained")


def bypass_config(backbone: str, form: str) -> TuningConfig:
    config = preset("bypass", backbone)
    config.bypass.form = form
    config.name = f"bypass-{form}"
    return config


def vit_loop(model, steps: int, batch: int, data, seed: int) -> list[float]:
    """AdamW (VTAB-1K's lr 1e-3, wd 1e-4) on cross-entropy over the trainable parameters; the per-step losses."""
    train_x, train_y = data
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        index = torch.randint(len(train_x), (batch,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        loss = F.cross_entropy(model(pixel_values=train_x[index]).logits, train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def pretrained_vit(steps: int, data) -> dict:
    """A tiny ViT fully trained on the first half of the classes: the 'pretrained' backbone the forms tune."""
    from transformers import ViTConfig, ViTForImageClassification

    from restune_sd.tiny import TINY_VIT

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=VIT_CLASSES)).train()
    vit_loop(model, steps, 32, data, seed=10_000)
    return model.state_dict()


def vit_run(form: str, seed: int, steps: int, batch: int, backbone: dict, data, test) -> dict:
    """The pretrained tiny ViT with a fresh head and a bypass of `form`, tuned on the other half of the classes."""
    from transformers import ViTConfig, ViTForImageClassification

    from restune_sd.inject import attach
    from restune_sd.tiny import TINY_VIT

    model = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=VIT_CLASSES))
    model.load_state_dict(backbone)
    torch.manual_seed(seed)  # the tuner's and the head's initialisation
    model.classifier.reset_parameters()
    model = attach(model, bypass_config("vit", form)).train()
    losses = vit_loop(model, steps, batch, data, seed)
    with torch.no_grad():
        accuracy = (model.eval()(pixel_values=test[0]).logits.argmax(-1) == test[1]).float().mean().item()
    return {"losses": losses, "test_accuracy": accuracy}


def sd_run(form: str, seed: int, steps: int, out: Path, model: str, data: str) -> dict:
    """`restune-sd train` on the tiny SD pipeline with a bypass of `form`."""
    from restune_sd.train import TrainConfig, train

    config_file = out / f"bypass-{form}.json"
    config_file.write_text(json.dumps(bypass_config("unet", form).to_dict()))
    run = out / "sd-runs" / f"{form}-seed{seed}"
    train(TrainConfig(model=model, data=data, tuner=str(config_file), output=str(run), max_steps=steps, batch_size=4,
                      learning_rate=1e-3, seed=seed))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {"losses": [json.loads(line)["loss"] for line in lines]}


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def compare(out: Path, tasks: list[str], seeds: list[int], sd_steps: int, vit_steps: int, last: int,
            pretrain_steps: int) -> dict:
    """Run `tasks` ('sd', 'vit') for both forms; a task not run keeps its results from an earlier run in `out`."""
    from restune_sd.datasets import make_synthetic
    from restune_sd.plots import curves_png
    from restune_sd.datasets.synthetic import PALETTE

    out.mkdir(parents=True, exist_ok=True)
    saved = out / "bypass_forms.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    results["last"] = last
    if "sd" in tasks:
        root = make_synthetic("folder", out / "data", num_classes=8, images_per_class=8, size=64)
        colours = [name for name, _ in PALETTE[:8]]
        data = split_folder(root, {"pretrain": tuple(colours[:4]), "tune": tuple(colours[4:])})
        model = pretrained_sd(out, pretrain_steps, data["pretrain"])
        results["sd"] = {form: [sd_run(form, seed, sd_steps, out, model, data["tune"]) for seed in seeds]
                         for form in BYPASS_FORMS}
        results["sd_setup"] = {"seeds": seeds, "steps": sd_steps, "batch": 4, "learning_rate": 1e-3,
                               "pretrain_steps": pretrain_steps, "pretrain_colours": colours[:4], "tune_colours": colours[4:]}
    if "vit" in tasks:
        half = VIT_CLASSES // 2
        backbone = pretrained_vit(pretrain_steps, class_images(600, seed=1, classes=range(half)))
        data, test = class_images(600, seed=2, classes=range(half, VIT_CLASSES)), class_images(300, seed=3, classes=range(half, VIT_CLASSES))
        results["vit"] = {form: [vit_run(form, seed, vit_steps, 32, backbone, data, test) for seed in seeds]
                          for form in BYPASS_FORMS}
        results["vit_setup"] = {"seeds": seeds, "steps": vit_steps, "batch": 32, "learning_rate": 1e-3,
                                "pretrain_steps": pretrain_steps, "pretrain_classes": half, "tune_classes": half}
    panels = []
    for task, title in (("sd", "tiny SD, diffusion loss"), ("vit", "tiny ViT, cross-entropy")):
        if task not in results:
            continue
        series = {}
        for form, runs in results[task].items():
            for run in runs:
                run["mean_loss_last"] = statistics.fmean(run["losses"][-last:])
            mean = [statistics.fmean(v) for v in zip(*(r["losses"] for r in runs))]
            series[form] = (list(range(1, len(mean) + 1)), smooth(mean, 25))
            summary = f"{task} {form}: mean loss of the last {last} steps, per seed {[round(r['mean_loss_last'], 4) for r in runs]}"
            if task == "vit":
                summary += f", test accuracy {[round(r['test_accuracy'], 3) for r in runs]}"
            print(summary)
        panels.append((f"{title} (mean of {len(runs)} seeds, 25-step average)", series))
    curves_png(panels, out / "bypass_forms.png")
    saved.write_text(json.dumps(results) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", choices=["sd", "vit"], default=["sd", "vit"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sd-steps", type=int, default=300)
    parser.add_argument("--vit-steps", type=int, default=300)
    parser.add_argument("--last", type=int, default=50, help="steps averaged for the final loss")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="full training of each tiny backbone first")
    args = parser.parse_args()
    compare(args.out, args.tasks, args.seeds, args.sd_steps, args.vit_steps, args.last, args.pretrain_steps)


if __name__ == "__main__":
    main()
