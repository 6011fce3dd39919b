"""Why Res-Tuning and Bypass trail LoRA on the digits transfer: one factor changed at a time (learning rate, the
scale init of the unbound branches, which of Res-Tuning's parts, sites, the bypass form and width, epochs), each over
several seeds, on the benchmark's own backbone and data (evaluation/digits_vit.py). Writes gap.json and gap.md.

    python -m restune_sd.evaluation.digits_gap --work evaluation/results/digits-vit-run/vit --out evaluation/results/digits/vit-gap

`--work` is a `bench digits --part vit` folder (its backbone and data are reused, as are its preset runs at the
benchmark's recipe); runs go to WORK/gap/, so a stopped sweep resumes where it was.
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from restune_sd.evaluation.digits_vit import TRANSFER, prepare, tune

# res-tuning-s1 (the ViT res-tuning preset before this study: every scale at its default)
RES_TUNING = [dict(kind="res-adapter", site="ffn", dim=10), dict(kind="res-prefix", site="attn", dim=10),
              dict(kind="res-prompt", site="attn", dim=10)]


def res_tuning(**changes) -> dict:
    """res-tuning-s1's recipe with some fields of its three tuners changed (`adapter_scale=0.1`, ...)."""
    tuners = [dict(t) for t in RES_TUNING]
    for key, value in changes.items():
        part, field = key.split("_", 1)
        for t in tuners:
            if t["kind"] == f"res-{part}":
                t[field] = value
    return {"tuners": tuners}


# group -> [(label, preset name or tuner config, settings that differ from the benchmark's recipe)]
EXPERIMENTS = {
    "lr": [(f"{name} lr {lr:g}", name, {"learning_rate": lr})
           for name in ("lora", "res-tuning-s1", "adapter", "bypass") for lr in (3e-4, 1e-3, 3e-3, 1e-2)],
    "parts": [("res-adapter alone (ffn, L=10)", {"tuners": RES_TUNING[:1]}, {}),
              ("res-prefix alone (l=10)", {"tuners": RES_TUNING[1:2]}, {}),
              ("res-prompt alone (l=10)", {"tuners": RES_TUNING[2:]}, {}),
              ("res-adapter + res-prefix", {"tuners": RES_TUNING[:2]}, {})],
    "scale": [("res-tuning-s1, adapter s0 = 0.1", res_tuning(adapter_scale=0.1), {}),
              ("res-tuning-s1, adapter s0 = 4", res_tuning(adapter_scale=4.0), {}),
              ("res-tuning-s1, prompt s0 = 1", res_tuning(prompt_scale=1.0), {}),
              ("res-tuning-s1, prefix s0 = 0.1", res_tuning(prefix_scale=0.1), {})],
    "sites": [("res-adapter beside attn and ffn (L=10)", {"tuners": [dict(kind="res-adapter", site="attn", dim=10),
                                                                     RES_TUNING[0]]}, {}),
              ("res-adapter beside the block (L=10)", {"tuners": [dict(kind="res-adapter", site="block", dim=10)]}, {}),
              ("res-prefix l=10, exact split (gate lambda)", {"tuners": [dict(RES_TUNING[1], gate="lambda")]}, {})],
    "bypass": [("bypass, paper form", {"bypass": dict(bottleneck=10, form="paper")}, {}),
               ("bypass, L=32", {"bypass": dict(bottleneck=32)}, {})],
    "scale-lr": [(f"res-tuning-s1, adapter s0 = 4 (the res-tuning preset), lr {lr:g}", res_tuning(adapter_scale=4.0), {"learning_rate": lr})
                 for lr in (3e-3, 1e-2, 3e-2)],
    "lr-high": [(f"{name} lr {lr:g}", name, {"learning_rate": lr}) for name in ("lora", "res-tuning-s1") for lr in (3e-2,)],
    "epochs": [(f"{name} 90 epochs", name, {"epochs": 90}) for name in ("lora", "res-tuning-s1")],
}


def run_experiment(work: Path, backbone: str, data: str, label: str, tuner, settings: dict, seeds) -> dict:
    slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
    if isinstance(tuner, dict):
        path = work / "gap" / "configs" / f"{slug}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": slug, **tuner}, indent=2) + "\n")
        tuner_arg = str(path)
    else:
        tuner_arg = tuner
    top1, params = [], None
    for seed in seeds:
        plain = isinstance(tuner, str) and TRANSFER | settings == TRANSFER
        folder = work / "runs" / tuner / f"seed{seed}" if plain else work / "gap" / slug / f"seed{seed}"
        done = folder / "results.json"
        result = json.loads(done.read_text()) if done.is_file() else tune(backbone, data, tuner_arg, seed, folder, **settings)
        top1.append(100 * result["top1"])
        params = result["tuner_params"]
    return {"label": label, "tuner": tuner, "settings": settings, "top1_per_seed": [round(t, 2) for t in top1],
            "top1_mean": round(statistics.mean(top1), 2), "top1_std": round(statistics.stdev(top1), 2),
            "tuner_params": params}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Why Res-Tuning and Bypass trail LoRA on the digits transfer: one factor at a time", "",
             f"Made with `{command}`. Each row: top-1 % on the held-out 5-9 digits, mean ± sd over the seeds; every "
             f"setting not named is the benchmark's (lr {TRANSFER['learning_rate']:g}, {TRANSFER['epochs']} epochs, "
             "batch 64, the presets' recipes). WORK is the `vit` folder of a `restune-sd bench digits --part vit` run "
             "(its backbone, data and preset runs are reused); res-tuning-s1 is the ViT res-tuning preset before this "
             "study, res-tuning now starts its Res-Adapters' scale at 4.", ""]
    group = None
    for row in rows:
        if row["group"] != group:
            group = row["group"]
            lines += ["", f"## {group}", "", "| run | top-1 % | per seed | tuner params |", "|---|---|---|---|"]
        lines.append(f"| {row['label']} | {row['top1_mean']:.1f} ± {row['top1_std']:.1f} | "
                     f"{', '.join(f'{t:.1f}' for t in row['top1_per_seed'])} | {row['tuner_params']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench digits --part vit folder (OUTPUT/vit)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gap.json and gap.md")
    parser.add_argument("--groups", default=",".join(EXPERIMENTS), help="comma-separated: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--seeds", default="0,1,2,3")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    backbone, data, _ = prepare(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "gap.json"
    rows = json.loads(saved.read_text())["rows"] if saved.is_file() else []
    command = shlex.join(["python", "-m", "restune_sd.evaluation.digits_gap", *(argv or sys.argv[1:])])
    started = time.time()
    for group in args.groups.split(","):
        for label, tuner, settings in EXPERIMENTS[group]:
            print(f"digits gap: {label}", flush=True)
            row = {"group": group} | run_experiment(args.work, backbone, data, label, tuner, settings, seeds)
            rows = [r for r in rows if r["label"] != label] + [row]
            saved.write_text(json.dumps({"command": command, "seconds": round(time.time() - started, 1),
                                         "rows": rows}, indent=2) + "\n")
            (args.out / "gap.md").write_text(markdown(rows, command))


if __name__ == "__main__":
    main()
