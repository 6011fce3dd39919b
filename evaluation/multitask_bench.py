"""Multi-task inference time on the real ViT-B/16 architecture (random weights): N bypass tasks in one call (one
shared backbone forward per batch) against N separate calls (one tuned model per task). Prints and writes figures;
asserts nothing.

    python -m restune_sd.evaluation.multitask_bench --out evaluation/results/multitask --tasks 2 5 19
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from restune_sd.config import preset
from restune_sd.inject import attach
from restune_sd.io import load_tuner, save_tuner
from restune_sd.models import build_architecture
from restune_sd.multitask import MultiTask


def saved_bypass_tuners(folder: Path, count: int) -> dict[str, str]:
    """`count` bypass tuners with moved weights and heads of VTAB-like sizes, saved as tuner folders."""
    tuners = {}
    for i in range(count):
        torch.manual_seed(i)
        model = attach(build_architecture("vit-b16", device="cpu", num_labels=[100, 47, 10, 2, 397][i % 5]),
                       preset("bypass", "vit"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
        tuners[f"task{i}"] = str(save_tuner(model, folder / f"task{i}"))
    return tuners


def frozen_backbone():
    """The same random ViT-B/16 every time, as one pretrained checkpoint loaded again would be."""
    torch.manual_seed(0)
    return build_architecture("vit-b16", device="cpu").eval()


def timed(call, repeats: int) -> float:
    """The median seconds of `repeats` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(task_counts: list[int], batch: int, repeats: int) -> list[dict]:
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    backbone = frozen_backbone()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tuners = saved_bypass_tuners(Path(tmp), max(task_counts))
        for count in task_counts:
            names = dict(list(tuners.items())[:count])
            shared = MultiTask(backbone, names)
            separate = [load_tuner(frozen_backbone(), path).eval() for path in names.values()]

            def one_by_one():
                with torch.no_grad():
                    return [model(pixel_values=pixels).logits for model in separate]

            together = shared(pixels)
            alone = one_by_one()
            agree = all(torch.allclose(together[name], logits, atol=1e-4, rtol=0) for name, logits in zip(names, alone))
            one_call, n_calls = timed(lambda: shared(pixels), repeats), timed(one_by_one, repeats)
            rows.append({"tasks": count, "batch": batch, "one_call_s": one_call, "separate_calls_s": n_calls,
                         "time_change_percent": 100 * (one_call - n_calls) / n_calls, "same_logits": agree})
            print(json.dumps(rows[-1]), flush=True)
            shared.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5, 19])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = bench(args.tasks, args.batch, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| tasks | one call (s) | separate calls (s) | time change | same logits (1e-4) |", "|---|---|---|---|---|"]
    lines += [f"| {r['tasks']} | {r['one_call_s']:.2f} | {r['separate_calls_s']:.2f} | {r['time_change_percent']:+.1f}% | "
              f"{r['same_logits']} |" for r in rows]
    (args.out / "multitask.md").write_text("\n".join(lines) + "\n")
    (args.out / "multitask.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
