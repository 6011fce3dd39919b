"""Benchmark on the real architectures (random weights): tuner params, activation memory kept for backward (the
frozen weights excluded), and seconds per forward+backward, for each preset. Prints figures; asserts nothing.

    python -m restune_sd.evaluation.benchmark --arch sd15 --latent 32 --batch 1
"""

import argparse
import json
import time

import torch

from restune_sd.config import preset, preset_names
from restune_sd.evaluation.memory import saved_activation_bytes
from restune_sd.inject import attach
from restune_sd.models import build_architecture
from restune_sd.summary import parameter_summary


def inputs_for(arch: str, batch: int, size: int, device):
    g = torch.Generator().manual_seed(0)
    if arch == "sd15":
        return (torch.randn(batch, 4, size, size, generator=g).to(device), torch.full((batch,), 500, device=device),
                torch.randn(batch, 77, 768, generator=g).to(device))
    return (torch.randn(batch, 3, size, size, generator=g).to(device),)


def output_of(model, arch, inputs):
    return model(*inputs).sample if arch == "sd15" else model(pixel_values=inputs[0]).logits


def measure(arch: str, tuner: str, batch: int, size: int, device, repeats: int) -> dict:
    kind = "unet" if arch == "sd15" else "vit"
    model = attach(build_architecture(arch, device="cpu").to(device), preset(tuner, kind)).train()
    summary = parameter_summary(model)
    inputs = inputs_for(arch, batch, size, device)
    activation_mb = saved_activation_bytes(lambda: output_of(model, arch, inputs), model) / 2**20
    timings = []
    for _ in range(repeats + 1):  # the first pass warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        output_of(model, arch, inputs).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    row = {"arch": arch, "tuner": tuner, "tuner_params": summary["tuner_params"], "activation_mb": round(activation_mb, 1),
           "seconds_fwd_bwd": round(min(timings[1:]), 3), "batch": batch, "size": size, "device": str(device)}
    if device.type == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "vit-b16"], default="sd15")
    parser.add_argument("--tuners", nargs="*", default=None, help="presets to measure (default: all)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="SD latent side (64 = 512 px); ViT image side for vit-b16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    kind = "unet" if args.arch == "sd15" else "vit"
    rows = []
    for tuner in args.tuners or preset_names(kind):
        rows.append(measure(args.arch, tuner, args.batch, args.latent, torch.device(args.device), args.repeats))
        print(json.dumps(rows[-1]) if args.json else
              f"{rows[-1]['tuner']:>11}  params {rows[-1]['tuner_params']:>12,}  activations {rows[-1]['activation_mb']:>9.1f} MB"
              f"  fwd+bwd {rows[-1]['seconds_fwd_bwd']:.3f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
