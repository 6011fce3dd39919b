"""The end-to-end demo, offline on CPU in a few minutes, in two parts:

- SD: tiny random pipeline -> train (Res-Tuning, Bypass, LoRA) -> sample -> FID -> a table. Its FID uses an Inception
  network with fixed *random* weights on a random model, so it checks the pipeline end to end and means nothing else.
- Real digits: the tiny ViT trained whole on scikit-learn's handwritten digits 0-4 (about a minute), then the same
  three tuners tuned on digits 5-9 with one seed: top-1 on held-out real images, a figure that means something
  (the benchmark behind it, over seeds and every preset: `restune-sd bench digits`).
"""

import json
from pathlib import Path

DEMO_TUNERS = ("res-tuning", "bypass", "lora-r4")  # r=4: the paper's r=50 exceeds the tiny widths
DIGITS_TUNERS = ("res-tuning", "bypass", "lora")  # the ViT presets (ViT LoRA is r=8 on q/v)


def run_demo(out: Path, steps: int = 60, images: int = 16) -> list[dict]:

    from restune_sd.datasets import build_dataset, make_synthetic
    from restune_sd.errors import UserError
    from restune_sd.evaluation.fid import compute_fid, write_random_inception_weights
    from restune_sd.evaluation.memory import unet_training_activation_mb
    from restune_sd.config import preset
    from restune_sd.inject import attach
    from restune_sd.models import load_unet
    from restune_sd.sample import SampleConfig, sample
    from restune_sd.tiny import write_tiny_sd
    from restune_sd.train import TrainConfig, train

    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds files: remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    print("1/6 writing a tiny SD pipeline and a small captioned data set")
    model = str(write_tiny_sd(out / "tiny-sd"))
    data_root = make_synthetic("folder", out / "data", num_classes=4, images_per_class=8, size=64)
    captions = build_dataset(f"folder:{data_root}", resolution=64)
    prompts = [captions.captions_of(i)[0] for i in range(min(images, len(captions)))]
    weights = write_random_inception_weights(out / "inception-random.pth")

    rows = []
    for name in DEMO_TUNERS:
        print(f"2/6 training {name} for {steps} steps")
        run = out / "runs" / name
        result = train(TrainConfig(model=model, data=f"folder:{data_root}", tuner=name, output=str(run), max_steps=steps,
                                   batch_size=4, learning_rate=1e-3, checkpoint_every=steps // 2))
        unet = attach(load_unet(model), preset(name, "unet")).train()  # for the activation measure below
        print(f"3/6 sampling {len(prompts)} images with {name}")
        sample(SampleConfig(model=model, out=str(out / "samples" / name), tuners=[str(run)], prompts=prompts, steps=20))
        print(f"4/6 FID of {name} against the training images")
        fid = compute_fid(out / "samples" / name, data_root, inception_weights=weights)
        rows.append({"tuner": name, "tuner_params": result["tuner_params"], "total_params": result["total_params"],
                     "activation_mb": unet_training_activation_mb(unet, batch=4, latent_size=8),
                     "seconds_per_step": result["seconds_per_step"], "final_loss": result["mean_loss_last_10"],
                     "fid_random_inception": fid["fid"]})
    digits = run_digits_part(out / "digits")
    print("6/6 summary")
    table = summary_table(rows) + "\n\n" + digits_table(digits)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"sd": rows, "digits_vit": digits}, indent=2) + "\n")
    return rows


def run_digits_part(folder: Path) -> list[dict]:
    """The tiny ViT pretrained on real digits 0-4, each of DIGITS_TUNERS tuned on 5-9 (seed 0); one row per tuner."""
    from restune_sd.evaluation import digits_vit

    print("5/6 real digits: training the tiny ViT whole on digits 0-4, then tuning on digits 5-9")
    backbone, data, pretrain = digits_vit.prepare(folder)
    rows = []
    for name in DIGITS_TUNERS:
        print(f"5/6 real digits: tuning {name} on digits 5-9")
        result = digits_vit.tune(backbone, data, name, 0, folder / "runs" / name)
        rows.append({"tuner": name, "top1": round(100 * result["top1"], 1), "tuner_params": result["tuner_params"],
                     "seconds_per_step": result["seconds_per_step"], "pretrain_top1_0_4": round(100 * pretrain["top1"], 1)})
    return rows


def digits_table(rows: list[dict]) -> str:
    from restune_sd.evaluation.digits_vit import TRANSFER as recipe

    lines = ["Real digits (scikit-learn's handwritten digits): the tiny ViT trained whole on 0-4 "
             f"({rows[0]['pretrain_top1_0_4']:.1f}% top-1 on held-out 0-4), each tuner trained on 5-9 for "
             f"{recipe['epochs']} epochs at lr {recipe['learning_rate']:g}, seed 0; top-1 on the 269 held-out 5-9 images.", "",
             "| tuner | tuner params | top-1 % (5-9) | s/step (1 thread) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tuner']} | {r['tuner_params']:,} | {r['top1']:.1f} | {r['seconds_per_step']:.3f} |")
    lines.append("\nOne seed: differences of a few points are within the spread that `restune-sd bench digits` measures "
                 "over four seeds (README, \"Real data\").")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    lines = ["| tuner | tuner params | % of UNet | activations kept for backward (MB, batch 4) | s/step (CPU) | loss (last 10) | FID* |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tuner']} | {r['tuner_params']:,} | {100 * r['tuner_params'] / r['total_params']:.2f} | "
                     f"{r['activation_mb']:.2f} | {r['seconds_per_step']:.3f} | {r['final_loss']:.4f} | {r['fid_random_inception']:.2f} |")
    lines.append("\n*The SD figures come from a tiny model with random weights, and FID from a randomly initialised "
                 "Inception: they check the pipeline end to end and say nothing about image quality; they are not "
                 "comparable to published FIDs.")
    return "\n".join(lines)
