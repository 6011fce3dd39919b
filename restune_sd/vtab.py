"""The VTAB-1K sweep: one classify run per task folder, a finished task's results reused only when they were made with
this sweep's settings, and the paper-style table (tasks, group means, mean of group means) with those settings."""

import dataclasses
import hashlib
import json
import math
import statistics
from pathlib import Path

from restune_sd.errors import UserError

# Where a run's files go and how it is logged: nothing a task's top-1 depends on.
NOT_DECIDING = ("output", "data", "resume", "checkpoint_every", "keep_checkpoints", "report_to", "tensorboard",
                "num_workers", "eval_batch_size", "cache_taps", "sweep")  # sweep: --vtab-all trains no sweep
TABLE, TABLE_MD = "vtab.json", "vtab.md"


def vtab_tasks_in(root) -> list[tuple[str, Path]]:
    """The VTAB-1K task folders under `root` (by name or alias), in the paper's table order."""
    from restune_sd.datasets import VTAB_TASKS, vtab_task

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--vtab-all {root}: no such folder; pass the folder that holds the task folders (cifar/, dtd/, ...)")
    found = {vtab_task(p.name): p for p in sorted(root.iterdir()) if p.is_dir() and vtab_task(p.name)}
    if not found:
        raise UserError(f"--vtab-all {root}: no VTAB-1K task folder in it (expected names such as cifar, dtd, svhn)")
    return [(task, found[task]) for task in VTAB_TASKS if task in found]


def sweep_settings(cfg) -> dict:
    """What decides a sweep's results: every setting of `cfg` but where its files go and how it logs, and the tuner's
    whole config (a YAML file's contents, not only its name), as JSON stores them."""
    from restune_sd.classify import model_resolution
    from restune_sd.config import resolve_tuner

    settings = {name: value for name, value in dataclasses.asdict(cfg).items() if name not in NOT_DECIDING}
    settings["resolution"] = cfg.resolution or model_resolution(cfg.model)  # as the run's config.json records it
    settings["tuning"] = resolve_tuner(cfg.tuner, "vit").to_dict()
    return json.loads(json.dumps(settings))


def difference(saved: dict, wanted: dict) -> str | None:
    """The first setting in which `saved` differs from `wanted`, in words; None when they agree."""
    from restune_sd.runconfig import RunConfig, same_setting

    # A run older than a setting (the optimizer, the EMA) ran as its default does.
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    for name, value in wanted.items():
        if name not in saved:
            if name in defaults and same_setting(name, defaults[name], value):
                continue
            return f"it records no {name}"
        if not same_setting(name, saved[name], value):
            if name == "tuning":
                return f"tuner {saved.get('tuner')!r} with another config, not {wanted.get('tuner')!r}"
            return f"{name}={saved[name]!r}, not {value!r}"
    return None


def read_json(path: Path, fix: str) -> dict:
    """A JSON object file the sweep wrote; a damaged one is one line naming it and `fix`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path} is damaged ({reason}): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (not a JSON object): {fix}")
    return data


def sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def require_own_table(out: Path, settings: dict) -> None:
    """An existing table in `out` may only be replaced by a sweep of the same settings, and a vtab.md only if it is
    the one such a sweep wrote (vtab.json records its checksum): a user's own notes of that name are never replaced."""
    table, notes = out / TABLE, out / TABLE_MD
    fix = f"move {table} (and {TABLE_MD}) away, or choose another --output"
    if not table.is_file():
        if notes.exists():
            raise UserError(f"{notes} is not a table this sweep wrote (there is no {TABLE} beside it), so it is not "
                            f"replaced: move it away, or choose another --output")
        return
    record = read_json(table, fix)
    if notes.exists() and (not notes.is_file() or record.get("vtab_md_sha256") != sha256_of(notes)):
        raise UserError(f"{notes} is not the table {table} records (edited since, or not written by a sweep), so it "
                        f"is not replaced: {fix}")
    saved = record.get("settings")
    if not isinstance(saved, dict):
        raise UserError(f"{table} records no settings (an older restune-sd wrote it), so this sweep cannot tell "
                        f"whether it may replace it: {fix}")
    if reason := difference(saved, settings):
        raise UserError(f"{table} holds a sweep made with other settings ({reason}): {fix}, or sweep with its settings")


def earlier_result(task: str, run: Path, settings: dict) -> dict | None:
    """A finished task's results if this sweep may reuse them; None where the task is still to train. A run of other
    settings, or damaged results, is one line: nothing made with other settings is reused or overwritten."""
    config, done = run / "config.json", run / "results.json"
    redo = f"remove the folder {run} to train {task} again, or choose another --output"
    if not config.is_file():
        if done.is_file():
            raise UserError(f"{done} has no config.json beside it recording the settings {task} was trained with: {redo}")
        return None
    if reason := difference(read_json(config, redo), settings):
        raise UserError(f"{run} holds {task} trained with other settings than this sweep's ({reason}): choose another "
                        "--output, or sweep with that run's settings")
    if not done.is_file():
        return None
    results = read_json(done, redo)
    top1, params = results.get("top1"), (results.get("tuner_params"), results.get("head_params"))
    if not (isinstance(top1, (int, float)) and math.isfinite(top1) and 0 <= top1 <= 1
            and all(isinstance(n, int) and n >= 0 for n in params)):
        raise UserError(f"{done} is damaged (no top1 in [0, 1] or no parameter counts): {redo}")
    return results


def vtab_all(cfg, root, out) -> dict:
    """Train and evaluate every VTAB-1K task under `root` into `out/TASK`, then write the paper-style table.

    Everything already in `out` is checked before any task trains: a finished task made with these settings is reused,
    anything made with other settings is refused in one line."""
    from restune_sd.runfolder import FolderLock

    with FolderLock(Path(out), "--output"):  # each task's run folder gets its own lock from the training loop
        return sweep(cfg, root, Path(out))


def sweep(cfg, root, out: Path) -> dict:
    from restune_sd.classify import classify

    tasks, settings = vtab_tasks_in(root), sweep_settings(cfg)
    rows = {task: earlier_result(task, out / task, {**settings, "data": f"vtab:{folder}"}) for task, folder in tasks}
    require_own_table(out, settings)
    for task, folder in tasks:
        if rows[task] is None:  # a task stopped after a checkpoint goes on from it (its settings were checked above)
            resume = "latest" if any((out / task / "checkpoints").glob("step-*.pt")) else None
            rows[task] = classify(dataclasses.replace(cfg, data=f"vtab:{folder}", output=str(out / task), resume=resume))
    return write_vtab_table(rows, out, cfg.tuner, settings)


def write_vtab_table(rows: dict[str, dict], out, tuner: str, settings: dict | None = None) -> dict:
    """`vtab.md` and `vtab.json`: each task's top-1, the group means and the mean of group means (Table 1's layout);
    vtab.json also records the sweep's settings."""
    from restune_sd.datasets import VTAB_GROUPS, VTAB_TASKS
    from restune_sd.files import write_text_atomic

    accuracy = {task: 100 * row["top1"] for task, row in rows.items()}
    groups = {g: statistics.fmean(accuracy[t] for t in accuracy if VTAB_TASKS[t][1] == g)
              for g in VTAB_GROUPS if any(VTAB_TASKS[t][1] == g for t in accuracy)}
    params = {row["tuner_params"] for row in rows.values()}
    table = {"tuner": tuner, "tasks": accuracy, "group_means": groups,
             "mean_of_group_means": statistics.fmean(groups.values()), "all_mean": statistics.fmean(accuracy.values()),
             "tuner_params": sorted(params)[0] if len(params) == 1 else sorted(params),
             "mean_head_params": statistics.fmean(row["head_params"] for row in rows.values()), "settings": settings}
    tasks = list(accuracy)
    lines = ["| tuner | " + " | ".join(tasks) + " | " + " | ".join(groups) + " | group mean | tuner params (M) |",
             "|---" * (len(tasks) + len(groups) + 3) + "|",
             f"| {tuner} | " + " | ".join(f"{accuracy[t]:.1f}" for t in tasks) + " | "
             + " | ".join(f"{v:.2f}" for v in groups.values()) + f" | {table['mean_of_group_means']:.2f} | "
             + (f"{table['tuner_params'] / 1e6:.2f}" if len(params) == 1 else "varies") + " |"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(lines) + "\n"
    table["vtab_md_sha256"] = hashlib.sha256(markdown.encode()).hexdigest()
    write_text_atomic(out / TABLE_MD, markdown)
    write_text_atomic(out / TABLE, json.dumps(table, indent=2) + "\n")
    return table
