"""The Markdown table and the PNG chart of a `restune-sd bench` result (see evaluation/bench.py)."""

import math

PAPER_SOURCE = "the paper's rows (docs/method.md §3: SD v1.5 on COCO2017 at 512 px, ViT-B/16 on VTAB-1K; GPU)"


def _number(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or (abs(value) >= 1000 and float(value).is_integer()):
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(row: dict, reference: dict | None, key: str) -> str:
    if not reference or row.get(key) is None or not reference.get(key):
        return "—"
    return f"{row[key] / reference[key]:.2f}"


def _memory(row: dict, reference: dict | None) -> str:
    """The ratio of memory above the weights; of peak memory (marked) where the weights were not measured apart."""
    if row.get("above_weights_mb") is not None:
        return _ratio(row, reference, "above_weights_mb")
    value = _ratio(row, reference, "peak_mb")
    return value if value == "—" else f"{value} (peak)"


def lora_base(names: list[str]) -> str | None:
    """What the ÷ LoRA columns divide by: `lora`, or else the first other LoRA preset that ran (e.g. `lora-r4`)."""
    if "lora" in names:
        return "lora"
    return next((name for name in names if name.startswith("lora") and " " not in name), None)


def base_notes(names: list[str], lora: str | None) -> list[str]:
    """Why a ÷ column is divided by another LoRA, or empty."""
    notes = []
    if lora is None:
        notes.append("÷ LoRA: no LoRA contender ran in this bench, so its columns are empty; add `lora` to --tuners.")
    elif lora != "lora":
        notes.append(f"÷ {lora}: no `lora` contender ran, so these columns divide by `{lora}`, the LoRA that did "
                     "(the paper's ratios below are to its LoRA r=50); add `lora` to --tuners for ratios to it.")
    if "full" not in names:
        notes.append("÷ full: no `full` contender ran in this bench, so its columns are empty; add `full` to --tuners.")
    return notes


def _speed(row: dict) -> str:
    for key in ("sample_seconds_per_image", "images_per_second"):
        if row.get(key) is not None:
            return f"{_number(row[key])} ({_number(row.get('bare_' + key))})"
    return "—"


def markdown(result: dict) -> str:
    """A heading saying what ran where, the measured table and the paper's ratios beside it."""
    env, cfg, rows = result["environment"], result["settings"], result["rows"]
    sd = cfg["kind"] == "sd"
    speed_key = "sample_seconds_per_image" if sd else "images_per_second"
    memory = ("CUDA max_memory_allocated" if env["gpu"] else
              "peak RSS (ru_maxrss) of the process, each count started once the C heap returned its freed pages (malloc_trim)")
    isa = f" ({env['cpu_isa']})" if env.get("cpu_isa") and not env["gpu"] else ""
    by_name = {row["contender"]: row for row in rows}
    lora = lora_base(list(by_name))
    per_lora = f"÷ {'LoRA' if lora in (None, 'lora') else lora}"
    lines = [
        f"# restune-sd bench {cfg['kind']}: {cfg['model']}, {cfg['resolution']} px, batch {cfg['batch']}, "
        f"{cfg['precision']}, {cfg['device']}" + (f", {cfg['attention']} attention" if sd else ""), "",
        f"Command: `{env['command']}`  ",
        f"Machine: {env['gpu'] or env['cpu']}{isa} ({env['cpu_count']} CPU cores, {env['memory_gb']} GB), torch "
        f"{env['torch']}, {env['date_utc']} UTC  ",
        f"Each contender in its own process: {cfg['warmup']} warm-up + {cfg['steps']} timed AdamW steps on random "
        f"inputs, {cfg['repeats']} interleaved repeat(s), medians. Memory: {memory}; \"above weights\" subtracts the "
        "memory held once the frozen weights were loaded. Saved activations: tensors autograd keeps for backward, "
        "parameters excluded. \"Frozen forward\": the same measure for one forward of the bare backbone under no "
        "autograd, the floor under a bypass step. " + (f"Sampling: {cfg['sample_steps']} DDIM steps at guidance 7.5, seconds per image, "
                                   "with the tuner (bare UNet)." if sd else
                                   f"Inference: images per second over {cfg['sample_steps']} batches, with the tuner "
                                   "(bare ViT).") + " \"(train CLI)\" rows run `restune-sd train` (text encoder, VAE "
        "and data included); their time is its logged seconds per step.", "",
        f"| contender | trainable params | peak MB | above weights MB | {per_lora} | ÷ full | frozen forward MB | "
        f"saved activations MB | s/step [min–max] | {per_lora} | ÷ full | "
        + ("sampling s/image (bare)" if sd else "images/s (bare)") + f" | {per_lora} |",
        "|---|" + "---:|" * 12,
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['contender']} | failed: {row['error']} |" + " |" * 11)
            continue
        path = row["contender"].removeprefix(row["contender"].split(" ")[0])  # "" or " (train CLI)": one path's bases
        to_lora, to_full = by_name.get(lora + path) if lora else None, by_name.get("full" + path)
        lines.append(
            f"| {row['contender']} | {_number(row['trainable_params'])} | {_number(row['peak_mb'], 0)} | "
            f"{_number(row.get('above_weights_mb'), 0)} | {_memory(row, to_lora)} | {_memory(row, to_full)} | "
            f"{_number(row.get('frozen_forward_mb'), 0)} | {_number(row.get('saved_activations_mb'), 1)} | {_number(row['step_seconds'])} "
            f"[{_number(row['step_seconds_min'])}–{_number(row['step_seconds_max'])}] | "
            f"{_ratio(row, to_lora, 'step_seconds')} | {_ratio(row, to_full, 'step_seconds')} | {_speed(row)} | "
            f"{_ratio(row, to_lora, speed_key)} |")
    notes = base_notes(list(by_name), lora)
    lines += ["", *(f"{note}  " for note in notes[:-1]), *notes[-1:]] if notes else []
    lines += ["", f"Beside them, {PAPER_SOURCE}:", "", "| tuner | train memory GB | ÷ LoRA | ÷ full | h/epoch | ÷ LoRA | ÷ full |",
              "|---|" + "---:|" * 6]
    for name, figures in paper_rows(result).items():
        lines.append(f"| {name} | " + " | ".join(_number(v) for v in figures) + " |")
    return "\n".join(lines) + "\n"


def paper_rows(result: dict) -> dict[str, list]:
    """For each measured tuner the paper has: memory, its ratios to LoRA and full, hours per epoch, their ratios."""
    paper = result["paper"]
    names = [row["contender"] for row in result["rows"]]
    rows = {}
    for name in names:
        if name not in paper["memory_gb"]:
            continue
        figures = []
        for table in (paper["memory_gb"], paper["hours_per_epoch"]):
            value = table.get(name)
            figures += [value] + [value / table[base] if value and table.get(base) else None for base in ("lora", "full")]
        rows[name] = figures
    return rows


def chart_png(result: dict, path) -> None:
    """Bars of our memory and step-time ratios to LoRA (to full where LoRA was not run) beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["rows"] if "error" not in row and not row["contender"].endswith("(train CLI)")]
    names = [row["contender"] for row in rows]
    base = "lora" if "lora" in names else "full" if "full" in names else None
    panels = (("training memory (here: above the frozen weights)", "above_weights_mb", "memory_gb"),
              ("training time (here: s/step; paper: h/epoch)", "step_seconds", "hours_per_epoch"))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, (title, ours_key, paper_key) in zip(axes, panels):
        paper = result["paper"][paper_key]
        ours = [row.get(f"ratio_to_{base}", {}).get(ours_key, math.nan) if base else math.nan for row in rows]
        theirs = [paper[n] / paper[base] if base and n in paper and base in paper else math.nan for n in names]
        positions = range(len(names))
        axis.bar([p - 0.2 for p in positions], ours, width=0.4, label="measured here")
        axis.bar([p + 0.2 for p in positions], theirs, width=0.4, label="paper (GPU)")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(list(positions), names, rotation=30, ha="right")
        axis.set_title(f"{title}\nratio to {base or '—'}", fontsize=10)
        axis.legend(fontsize=8)
    env, cfg = result["environment"], result["settings"]
    figure.suptitle(f"{cfg['model']}, {cfg['resolution']} px, batch {cfg['batch']}, {cfg['precision']} on "
                    f"{env['gpu'] or env['cpu']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
