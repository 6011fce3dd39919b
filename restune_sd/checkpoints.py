"""A run's checkpoints: written with their SHA-256 and a loadable tuner folder beside them, checked before use (never
unpickling code), rotated to the newest usable ones; and the random state a resume restores."""

import dataclasses
import hashlib
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from restune_sd.ema import ema_folder
from restune_sd.errors import UserError
from restune_sd.files import write_atomic, write_text_atomic, writing

CHECKPOINTS = "checkpoints"
CHECKPOINT_KEYS = ("step", "tuner", "optimizer", "scheduler", "rng", "config", "tuning")


def checksum_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}.sha256")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, checked against its checksum and read without running any code it may carry;
    a UserError says why it cannot be used. A checkpoint without a checksum file (restune-sd before 0.2) loads."""
    if (expected := read_checksum(path)) is not None and sha256_file(path) != expected:
        raise UserError(f"checkpoint {path} is damaged (its SHA-256 does not match {checksum_path(path).name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise UserError(f"checkpoint {path} holds objects that could run code when loaded, so it is not loaded") from None
        raise UserError(f"checkpoint {path} is damaged ({str(error).splitlines()[0]})") from None
    except Exception as error:  # a truncated or empty file: torch raises RuntimeError, EOFError, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"checkpoint {path} is damaged ({reason})") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise UserError(f"checkpoint {path} is not a restune-sd checkpoint of this version (it lacks the run's settings)")
    return state


def read_checksum(path: Path) -> str | None:
    try:
        return checksum_path(path).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""  # unreadable: matches no file


def intact(path: Path) -> bool:
    """Whether a checkpoint can be resumed from (checksum, or for one without a checksum file, a full load)."""
    expected = read_checksum(path)
    if expected is not None:
        return path.is_file() and sha256_file(path) == expected
    try:
        load_checkpoint(path)
    except UserError:
        return False
    return True


def rng_state() -> dict:
    """Every generator the run touches, as tensors and plain values, so a checkpoint loads with weights_only=True."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def disk_hint(last_checkpoint: Path | None) -> str:
    if last_checkpoint:
        return f"free some space, then --resume latest (the last good checkpoint is {last_checkpoint})"
    return "free some space and run again (the run wrote no checkpoint yet)"


def save_checkpoint(run: Path, step: int, state: dict, write, keep: int, last: Path | None, tuner_extra: dict,
                    ema=None) -> Path:
    """A resumable checkpoint `step-XXXXXXXX.pt` (its SHA-256 in a `.sha256` file written before it takes its name, so
    a file under that name always has a checksum to match) and beside it the tuner as a folder `sample --tuner` loads
    (`step-XXXXXXXX-tuner/`, with an EMA also `step-XXXXXXXX-tuner-ema/`); then the older checkpoints beyond the
    newest `keep` usable ones are deleted. `write(folder, extra, hint, ema)` writes the tuner (loop.Job.tuner_writer)."""
    folder = run / CHECKPOINTS
    path = folder / f"step-{step:08d}.pt"
    hint = disk_hint(last)
    with writing(folder, hint):
        folder.mkdir(exist_ok=True)

    def save_with_checksum(tmp):
        torch.save(state, tmp)
        write_text_atomic(checksum_path(path), sha256_file(tmp) + "\n", hint)

    write_atomic(path, save_with_checksum, hint)
    write(checkpoint_tuner(path), {"trained_steps": step, **tuner_extra}, hint, ema)
    rotate(folder, path, keep)
    return path


def rotate(folder: Path, newest: Path, keep: int) -> None:
    """Delete the checkpoints older than the newest `keep` usable ones at or before `newest` (which counts as one).

    Unusable files among the kept ones are passed over, not counted; checkpoints past `newest` (a longer earlier
    attempt's, when a run resumed from an older one) are left alone: the run replaces each as it passes its step.
    """
    kept = 0
    for path in sorted(folder.glob("step-*.pt"), reverse=True):
        if path.name > newest.name:
            continue
        if kept < keep:
            kept += path == newest or intact(path)
            continue
        path.unlink()
        checksum_path(path).unlink(missing_ok=True)
        shutil.rmtree(checkpoint_tuner(path), ignore_errors=True)
        shutil.rmtree(ema_folder(checkpoint_tuner(path)), ignore_errors=True)


def checkpoint_tuner(checkpoint: Path) -> Path:
    """The loadable tuner folder written with a checkpoint (a name resume's step-*.pt glob never matches)."""
    return checkpoint.with_name(f"{checkpoint.stem}-tuner")


def write_tuner(model, folder: Path, extra: dict, hint: str, ema=None) -> None:
    """The tuner as `load_tuner` and `sample --tuner` read it, written whole, and with an `ema` (restune_sd.ema) its
    averaged weights as a tuner of the same format in FOLDER-ema; an earlier one there (a resumed run passing the same
    step again) is replaced."""
    from restune_sd.io import save_tuner

    def write(target: Path) -> None:
        if target.exists():
            shutil.rmtree(target)
        with writing(target, hint):
            save_tuner(model, target, extra=extra)

    write(folder)
    if ema:
        with ema.applied():
            write(ema_folder(folder))


def checkpoint_state(step: int, tuner: dict, optimizer, scheduler, cfg, tuning, run_id: str, entry: dict,
                     ema=None) -> dict:
    """A checkpoint's contents, all tensors and plain values: `entry` is the step's metrics, for a run resumed at its
    last step (killed during the final validation, say) to log that step without training it again."""
    return {"step": step, "tuner": tuner, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state(), "config": dataclasses.asdict(cfg), "tuning": tuning.to_dict(), "run_id": run_id,
            "entry": {k: v for k, v in entry.items() if isinstance(v, (int, float, str))},
            **({"ema": ema.state_dict()} if ema else {})}
