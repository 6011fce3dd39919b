"""The SD half of `restune-sd bench digits`: a small SD pipeline pretrained on digits 0-4 (evaluation/digits_pipeline.py),
every UNet preset tuned on digits 5-9 with the same steps, batch and learning rate, images sampled per digit and read
by a classifier of real digits (evaluation/digits_scorer.py): conditional accuracy and a Frechet distance.

Everything runs through the project's own code paths: `train` (the `full` pretraining and every tuner), `export
--format pipeline`, `sample`. Figures are the mean and spread over the first SEEDS_USED seeds of --seeds.
"""

import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from restune_sd.errors import UserError
from restune_sd.evaluation import digits_data
from restune_sd.evaluation.digits_pipeline import RESOLUTION, PretrainSettings, pretrain, reconstruct
from restune_sd.evaluation.digits_scorer import DigitScorer, Splits, rendered

# Two seeds keep the SD half near 15 minutes on a 2-core CPU (each seed tunes every preset once).
SEEDS_USED = 2
SAMPLE_SEED_STRIDE = 100_000  # seed s samples with generator seeds s * stride + i: seeds never share noise
GRID_COLUMNS = 10
BASE = "pretrained (no tuning)"


@dataclass(frozen=True)
class SDSettings:
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    tune_steps: int = 200
    tune_batch: int = 32
    learning_rate: float = 2e-3  # every preset alike (at 1e-3, 150 steps, LoRA moved 15% of 5-9 prompts, full 51%)
    caption_dropout: float = 0.1  # as in pretraining, so guidance keeps an unconditional model
    samples_per_digit: int = 20
    sample_steps: int = 20  # DDIM
    guidance: float = 3.0


QUICK = SDSettings(pretrain=PretrainSettings(vae_steps=2, vae_batch=8, unet_steps=2, unet_batch=4), tune_steps=2,
                   tune_batch=4, samples_per_digit=2, sample_steps=2)


def run(cfg, folder: Path) -> dict:
    """Pretrain, tune every preset on 5-9 per seed, sample and score; grids under folder/grids. Returns rows, the
    per-tuner summary, the reference figures and the markdown section."""
    from restune_sd.config import preset_names

    settings = QUICK if cfg.quick else SDSettings()
    presets = list(cfg.presets or preset_names("unet"))
    unknown = [name for name in presets if name not in preset_names("unet")]
    if unknown:
        raise UserError(f"--tuners: {unknown[0]!r} is not a UNet preset; use some of {', '.join(preset_names('unet'))}")
    seeds = tuple(cfg.seeds[:SEEDS_USED])
    if len(seeds) < len(cfg.seeds):
        print(f"digits sd: uses the first {SEEDS_USED} seeds of --seeds ({','.join(map(str, seeds))}) to stay near "
              "15 minutes on 2 cores", flush=True)
    prepare(folder, cfg.overwrite)
    started = time.time()

    made = pretrain(folder, settings.pretrain)
    pipeline = Path(made["pipeline"])
    digits = digits_data.load()
    splits = Splits.make(digits)
    scorer = DigitScorer(splits.train, RESOLUTION)
    transfer_train, _ = digits_data.split(digits, digits_data.TRANSFER_DIGITS)
    data = digits_data.write_captioned(folder / "data" / "transfer", transfer_train, RESOLUTION)
    reference = references(scorer, splits, pipeline, settings.samples_per_digit)

    rows, grids = [], {}
    for seed in seeds:
        images = draw(pipeline, None, folder / "samples" / "base" / f"seed-{seed}", range(10), settings, seed)
        for group in (digits_data.PRETRAIN_DIGITS, digits_data.TRANSFER_DIGITS):
            rows.append({"tuner": BASE, "seed": seed, "digits": label(group), "trainable_params": 0,
                         **score(scorer, images, group, splits)})
        grids.setdefault(BASE, write_grid(images, folder / "grids" / "pretrained.png"))
    for name in presets:
        for seed in seeds:
            result = tune(pipeline, data, name, seed, folder / "runs" / f"{name}-seed{seed}", settings)
            images = draw(pipeline, folder / "runs" / f"{name}-seed{seed}", folder / "samples" / name / f"seed-{seed}",
                          digits_data.TRANSFER_DIGITS, settings, seed)
            rows.append({"tuner": name, "seed": seed, "digits": label(digits_data.TRANSFER_DIGITS),
                         "trainable_params": result["tuner_params"], "unet_params": result["total_params"],
                         "train_seconds": round(result["wall_seconds"], 1),
                         "seconds_per_step": round(result["seconds_per_step"], 4),
                         "final_loss": round(result["mean_loss_last_10"], 4),
                         **score(scorer, images, digits_data.TRANSFER_DIGITS, splits)})
            grids.setdefault(name, write_grid(images, folder / "grids" / f"{name}.png"))
    summary = summarize(rows)
    record = {"settings": asdict(settings), "seeds": list(seeds), "presets": presets, "pretrained": made,
              "reference": reference, "seconds": round(time.time() - started, 1), "quick": cfg.quick}
    return {"rows": rows, "summary": summary, **record,
            "markdown": markdown(summary, record, {k: f"{folder.name}/{v.relative_to(folder)}" for k, v in grids.items()})}


def prepare(folder: Path, overwrite: bool) -> None:
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise UserError(f"{folder} already holds an earlier SD run: pass --overwrite to replace it, or choose "
                            "another --output")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def label(group) -> str:
    return f"{min(group)}-{max(group)}"


def tune(pipeline: Path, data: Path, name: str, seed: int, run: Path, settings: SDSettings) -> dict:
    from restune_sd.train import TrainConfig, train

    return train(TrainConfig(model=str(pipeline), data=f"folder:{data}", tuner=name, output=str(run),
                             max_steps=settings.tune_steps, batch_size=settings.tune_batch,
                             learning_rate=settings.learning_rate, caption_dropout=settings.caption_dropout, seed=seed,
                             report_to="none"))


def draw(pipeline: Path, tuner: Path | None, out: Path, group, settings: SDSettings, seed: int) -> dict[int, list]:
    """`samples_per_digit` images per digit of `group` through `restune-sd sample`, as {digit: [PIL images]}."""
    from restune_sd.sample import SampleConfig, sample

    group, n = list(group), settings.samples_per_digit
    prompts = [digits_data.caption(d) for d in group for _ in range(n)]
    sample(SampleConfig(model=str(pipeline), out=str(out), tuners=[str(tuner)] if tuner else [], prompts=prompts,
                        steps=settings.sample_steps, guidance=settings.guidance, seed=seed * SAMPLE_SEED_STRIDE,
                        batch_size=len(prompts), fp16=False))
    images = [Image.open(out / f"{i:05d}.png").convert("RGB") for i in range(len(prompts))]
    return {d: images[k * n:(k + 1) * n] for k, d in enumerate(group)}


def score(scorer: DigitScorer, images: dict[int, list], group, splits: Splits) -> dict:
    """Conditional accuracy (%) over `group` and per digit, and the Frechet distance to the real test digits of `group`."""
    chosen = [image for d in group for image in images[d]]
    wanted = [d for d in group for _ in images[d]]
    predicted = scorer.predict(chosen)
    per_digit = {str(d): round(100 * float(np.mean(predicted[np.asarray(wanted) == d] == d)), 1) for d in group}
    return {"accuracy": round(100 * float(np.mean(predicted == np.asarray(wanted))), 2), "per_digit": per_digit,
            "frechet": round(scorer.frechet(chosen, rendered(splits.test_of(tuple(group)), RESOLUTION)), 3)}


def references(scorer: DigitScorer, splits: Splits, pipeline: Path, per_digit: int) -> dict:
    """What bounds the figures: the classifier on real test digits (the ceiling of conditional accuracy), on the
    VAE's reconstructions of them (the decoder's ceiling), and the Frechet distance of as many real train digits as
    a tuner samples (the floor at that sample size)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    out = {}
    for group in (digits_data.PRETRAIN_DIGITS, digits_data.TRANSFER_DIGITS):
        test = splits.test_of(group)
        train = splits.train.subset(np.concatenate([np.flatnonzero(splits.train.labels == d)[:per_digit] for d in group]))
        out[label(group)] = {
            "real_test_accuracy": round(100 * scorer.real_accuracy(test), 2),
            "vae_reconstruction_accuracy": round(100 * scorer.accuracy(reconstruct(vae, test.images), test.labels), 2),
            "real_train_frechet": round(scorer.frechet(rendered(train, RESOLUTION), rendered(test, RESOLUTION)), 3),
            "test_images": len(test.labels)}
    return out


def write_grid(images: dict[int, list], path: Path, scale: int = 2) -> Path:
    """One row per digit (in order), GRID_COLUMNS samples a row, each shown at `scale` times its size."""
    side = RESOLUTION * scale
    rows = list(images)
    sheet = Image.new("RGB", (GRID_COLUMNS * side, len(rows) * side))
    for r, digit in enumerate(rows):
        for c, image in enumerate(images[digit][:GRID_COLUMNS]):
            sheet.paste(image.resize((side, side), Image.NEAREST), (c * side, r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (tuner, digits): mean and standard deviation over seeds."""
    keys = list(dict.fromkeys((r["tuner"], r["digits"]) for r in rows))
    summary = []
    for tuner, group in keys:
        mine = [r for r in rows if (r["tuner"], r["digits"]) == (tuner, group)]
        line = {"tuner": tuner, "digits": group, "seeds": len(mine), "trainable_params": mine[0]["trainable_params"]}
        for metric in ("accuracy", "frechet", "train_seconds", "seconds_per_step"):
            values = [r[metric] for r in mine if metric in r]
            if values:
                line[metric] = round(statistics.fmean(values), 3)
                line[f"{metric}_sd"] = round(statistics.stdev(values), 3) if len(values) > 1 else None
        if "unet_params" in mine[0]:
            line["unet_params"] = mine[0]["unet_params"]
        summary.append(line)
    return summary


def spread(line: dict, metric: str, digits: int) -> str:
    sd = line.get(f"{metric}_sd")
    return f"{line[metric]:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def markdown(summary: list[dict], record: dict, grids: dict[str, str]) -> str:
    s, ref = record["settings"], record["reference"]
    made = record["pretrained"]
    seeds = ",".join(map(str, record["seeds"]))
    lines = [
        "## Stable Diffusion: tuning a digits 0-4 pipeline to digits 5-9", "",
        f"A {made['unet_params']:,}-parameter UNet (restune_sd/tiny.py's, 8 x 8 latents) with a VAE trained on the "
        f"digits 0-4 ({made['vae_params']:,} parameters, {s['pretrain']['vae_steps']} steps) and a frozen random text "
        f"encoder, pretrained with `train --tuner full` for {s['pretrain']['unet_steps']} steps on the 0-4 train "
        f"split ({made['train_images']} images at {RESOLUTION} px, captions \"a handwritten digit D\"). Each preset is "
        f"then tuned on the 5-9 train split for {s['tune_steps']} steps (batch {s['tune_batch']}, AdamW lr "
        f"{s['learning_rate']:g}, captions dropped {s['caption_dropout']:.0%}), and samples "
        f"{s['samples_per_digit']} images per digit (DDIM {s['sample_steps']} steps, guidance {s['guidance']:g}). "
        f"A classifier of real digits (an MLP on the 8 x 8 grid) reads each image: *accuracy* is the share read as "
        f"the digit its prompt asked for (chance 10%), *FD* the Frechet distance to the real 5-9 test digits in that "
        f"classifier's 64 hidden features (lower is better). Mean ± sd over seeds {seeds}.", "",
        *(["**--quick**: a few steps of everything, to check the pipeline; these figures mean nothing.", ""]
          if record["quick"] else []),
        "| tuner | trainable params | % of UNet | accuracy 5-9 (%) | FD 5-9 | train s | s/step | samples |",
        "|---|---|---|---|---|---|---|---|"]
    tuned = [line for line in summary if line["tuner"] != BASE]
    for line in tuned:
        lines.append(f"| {line['tuner']} | {line['trainable_params']:,} | "
                     f"{100 * line['trainable_params'] / line['unet_params']:.1f} | {spread(line, 'accuracy', 1)} | "
                     f"{spread(line, 'frechet', 2)} | {line['train_seconds']:.0f} | {line['seconds_per_step']:.3f} | "
                     f"[grid]({grids[line['tuner']]}) |")
    base = {line["digits"]: line for line in summary if line["tuner"] == BASE}
    high, low = ref["5-9"], ref["0-4"]
    lines += [
        f"| {BASE} | 0 | 0 | {spread(base['5-9'], 'accuracy', 1)} | {spread(base['5-9'], 'frechet', 2)} | | | "
        f"[grid]({grids[BASE]}) |", "",
        f"Bounds: the classifier reads {high['real_test_accuracy']:.1f}% of the real 5-9 test digits right "
        f"({low['real_test_accuracy']:.1f}% of 0-4), and {high['vae_reconstruction_accuracy']:.1f}% of their VAE "
        f"reconstructions (the decoder's ceiling); {s['samples_per_digit']} real train digits per digit lie at FD "
        f"{high['real_train_frechet']:.2f} from the test digits (the floor at this sample size). The pretrained "
        f"pipeline itself draws the digits it learned, 0-4, at {spread(base['0-4'], 'accuracy', 1)}% accuracy and FD "
        f"{spread(base['0-4'], 'frechet', 2)}.", "", reading(tuned, base, high)]
    return "\n".join(lines) + "\n"


def reading(tuned: list[dict], base: dict, high: dict) -> str:
    """The paragraph under the table, from the figures themselves."""
    if not tuned:
        return ""
    best = max(tuned, key=lambda line: line["accuracy"])
    closest = min(tuned, key=lambda line: line["frechet"])
    full = next((line for line in tuned if line["tuner"] == "full"), None)
    text = (f"Before tuning the pipeline reads prompts for 5-9 as those digits {base['5-9']['accuracy']:.1f}% of the "
            f"time; after {best['tuner']}, the most accurate here, {best['accuracy']:.1f}% (the classifier's ceiling "
            f"is {high['real_test_accuracy']:.1f}%). {closest['tuner']} comes closest to the real digits (FD "
            f"{closest['frechet']:.2f}, against {base['5-9']['frechet']:.2f} untuned).")
    if full and full is not best:
        text += f" Full fine-tuning reaches {full['accuracy']:.1f}% with every UNet weight trained."
    return text + (" Differences within one sd of each other are not resolved by this many seeds and samples.")
