"""`restune-sd bench sd --sweep K`: one bypass variant against K trained on one frozen forward (restune_sd.sweep),
side by side, each in a fresh process: seconds per optimizer step and peak memory above the weights, and their ratios
to the one variant's (issue 18's target for K = 4 on SD v1.5 at 256 px: at most 1.6x the time, 1.3x the memory).

Each process loads the frozen UNet, notes its memory, attaches the bypass (K ladders for the sweep, each its own
AdamW param group and clipping norm, as `train --sweep` trains them) and times warm-up and timed steps on random
inputs of SD's shapes. Repeats are interleaved and the medians reported, as `restune-sd bench` does.
"""

import json
import shlex
import statistics
import subprocess
import sys
import time

import torch

from restune_sd.config import preset
from restune_sd.errors import UserError
from restune_sd.evaluation.bench import BenchConfig, check, environment, settings, spelled_out
from restune_sd.evaluation.bench_child import (DTYPES, Workload, child_env, failure, load_backbone, memory_mb,
                                               release_freed_heap, reset_peak, synchronize)
from restune_sd.files import write_text_atomic

TARGETS = {"step_seconds": 1.6, "above_weights_mb": 1.3}  # the sweep's figure over one variant's, at most
MAX_SWEEP = 64
KEYS = ("model", "resolution", "batch", "precision", "steps", "warmup", "device", "attention")  # what a round reads


def measure_sweep(spec: dict) -> dict:
    """One contender, `spec["count"]` bypass variants (1: the bypass alone, as `train` trains it)."""
    from restune_sd.attention import set_attention_backend
    from restune_sd.inject import attach
    from restune_sd.masked_loss import per_sample_mse
    from restune_sd.sweep import VariantRows, attach_ladders

    device, dtype, count = torch.device(spec["device"]), DTYPES[spec["precision"]], spec["count"]
    model = load_backbone("sd", spec["model"], device)
    if dtype != torch.float32:
        model.to(dtype)
    set_attention_backend(model, spec["attention"])
    workload = Workload("sd", model, spec, device, dtype)
    release_freed_heap()  # what loading freed is not part of the weights
    weights_mb = memory_mb(device, peak=False)
    tuning = preset("bypass", "unet")
    attach(model, tuning)
    ladders = attach_ladders(model, [tuning] * count, seed=0).ladders if count > 1 else [model.restune_bypass.ladder]
    called = VariantRows(model, count, "sample") if count > 1 else model
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    # Each variant its own learning rate: one AdamW with K groups is K AdamWs.
    optimizer = torch.optim.AdamW([{"params": list(ladder.parameters()), "lr": 1e-4 * 2**k}
                                   for k, ladder in enumerate(ladders)], weight_decay=1e-2)
    model.train()

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        with workload.autocast():
            prediction = called(workload.latents, workload.timesteps, workload.context).sample.float()
        per_sample_mse(prediction, workload.noise).mean(dim=-1).sum().backward()
        for ladder in ladders:
            torch.nn.utils.clip_grad_norm_(list(ladder.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    reset_peak(device)
    seconds = [step() for _ in range(spec["warmup"] + spec["steps"])]
    peak_mb = memory_mb(device, peak=True)
    return {"variants": count, "weights_mb": weights_mb, "peak_mb": peak_mb, "above_weights_mb": peak_mb - weights_mb,
            "trainable_params": sum(p.numel() for ladder in ladders for p in ladder.parameters()),
            "step_seconds_all": seconds[spec["warmup"]:]}


def run_child(spec: dict) -> dict:
    finished = subprocess.run([sys.executable, "-m", "restune_sd.evaluation.bench_sweep", json.dumps(spec)],
                              capture_output=True, text=True, env=child_env())
    if finished.returncode:
        return {"error": failure(finished)}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run_sweep_bench(cfg: BenchConfig, count: int) -> dict:
    """One variant and `count` variants, `cfg.repeats` interleaved rounds; results.json and results.md in cfg.output."""
    if cfg.kind != "sd":
        raise UserError("--sweep measures `train --sweep` on SD: use `bench sd --sweep K`")
    if not 2 <= count <= MAX_SWEEP:
        raise UserError(f"--sweep must be a number of variants from 2 to {MAX_SWEEP}, not {count}")
    cfg = check(cfg)
    base = {key: getattr(cfg, key) for key in KEYS}
    runs = {1: [], count: []}
    for round_ in range(cfg.repeats):
        for k in ((1, count) if round_ % 2 == 0 else (count, 1)):
            print(f"bench sd --sweep: {k} variant(s), round {round_ + 1}", file=sys.stderr, flush=True)
            runs[k].append(run_child({**base, "count": k}))
    rows = [aggregate(k, runs[k]) for k in (1, count)]
    ratios = {key: rows[1][key] / rows[0][key] for key in TARGETS if rows[0].get(key) and rows[1].get(key) is not None}
    result = {"environment": environment(cfg, command_line(cfg, count)), "settings": {**settings(cfg), "sweep": count},
              "rows": rows, "ratios": ratios, "targets": TARGETS,
              "meets_targets": bool(ratios) and all(ratios.get(key, float("inf")) <= TARGETS[key] for key in TARGETS)}
    cfg.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.output / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(cfg.output / "results.md", markdown(result))
    return result


def command_line(cfg: BenchConfig, count: int) -> str:
    """The `restune-sd bench sd --sweep` command that repeats this run, every setting it reads spelled out."""
    words = ["restune-sd", "bench", "sd", "--sweep", str(count), "--output", str(cfg.output)]
    return shlex.join(words + spelled_out(cfg, (*KEYS, "repeats")))


def aggregate(count: int, runs: list[dict]) -> dict:
    good = [run for run in runs if "error" not in run]
    if not good:
        return {"variants": count, "error": runs[0]["error"]}
    row = {key: statistics.median(run[key] for run in good) for key in ("weights_mb", "peak_mb", "above_weights_mb")}
    return {"variants": count, "repeats": len(good), "trainable_params": good[0]["trainable_params"], **row,
            "step_seconds": statistics.median(statistics.median(run["step_seconds_all"]) for run in good)}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# One bypass vs {s['sweep']} on one frozen forward (`train --sweep`)", "",
             f"{s['model']}, {s['resolution']} px, batch {s['batch']}, {s['precision']}, {s['device']}; "
             f"medians of {s['repeats']} round(s) of {s['steps']} timed steps", "",
             "| variants | trainable params | s / step | peak MB | MB above weights |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['variants']} | failed: {row['error']} | | | |")
            continue
        lines.append(f"| {row['variants']} | {row['trainable_params']:,} | {row['step_seconds']:.3f} | "
                     f"{row['peak_mb']:.0f} | {row['above_weights_mb']:.0f} |")
    ratios, targets = result["ratios"], result["targets"]
    lines += [""] + [f"- {key}: {ratios[key]:.2f}x one variant's (target at most {targets[key]}x)" for key in ratios]
    lines.append(f"- meets the targets: {'yes' if result['meets_targets'] else 'no'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(measure_sweep(json.loads(sys.argv[1]))), flush=True)
