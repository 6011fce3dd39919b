"""Where a diffusion run keeps its VAE latents: a folder shared by every run (--cache-dir, by default the user's cache
folder), keyed by what a latent depends on (the VAE's config and weights, its dtype, and the resized, cropped and
flipped pixels), so a later run on the same images encodes none of them again; or, with --cache-dir none, the run's
own RUN_DIR/cache/latents, keyed by sample (image index, flip, crop size) as before."""

import hashlib
import json
import os
from pathlib import Path

import torch

from restune_sd.encoders import TensorFiles
from restune_sd.errors import UserError
from restune_sd.files import warn

AUTO, OFF = "auto", "none"  # --cache-dir's words: the user's cache folder; no shared cache
FORMAT = "restune-sd latent moments v2"  # what an entry holds (the VAE's mean and std, each image encoded alone):
# a change starts new keys


def user_cache_folder() -> Path:
    """$XDG_CACHE_HOME/restune-sd/latents, or ~/.cache/restune-sd/latents (the XDG spec ignores a relative value)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "restune-sd" / "latents"


def cache_folder(cache_dir: str) -> Path | None:
    """The folder --cache-dir names: None for none, the user's cache folder for auto."""
    if cache_dir == OFF:
        return None
    return user_cache_folder() if cache_dir == AUTO else Path(cache_dir).expanduser()


def unusable(folder: Path) -> str | None:
    """Why latents cannot be written under `folder` (made when missing), or None when they can."""
    folder = folder.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def require_cache_dir(cache_dir) -> None:
    """--cache-dir is a folder that can be made or written, auto or none; checked before any model loads. The auto
    default is checked when it is used, and only warned about (see latent_store)."""
    if not isinstance(cache_dir, str) or not cache_dir.strip():
        raise UserError(f"--cache-dir {cache_dir!r} names no folder: pass a folder, {AUTO} (the user's cache folder) "
                        f"or {OFF} (latents in RUN_DIR/cache/latents, this run's alone)")
    if cache_dir in (AUTO, OFF):
        return
    if reason := unusable(cache_folder(cache_dir)):
        raise UserError(f"--cache-dir {cache_dir}: {reason}: pass a folder where latents can be written (it is made "
                        f"if missing), or {OFF} to keep them in the run folder")


def vae_identity(vae, dtype: torch.dtype) -> str:
    """A digest of what the VAE computes: its config (less where it was loaded from), every weight's bytes and the
    dtype it encodes in. Once per run: a SD VAE's 84M weights hash in well under a second."""
    digest = hashlib.sha256(f"{FORMAT}\n{dtype}\n".encode())
    config = {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"\n{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def latent_shape(vae_config, size) -> tuple[int, int, int]:
    """(channels, height, width) of the latent of an image of `size` (height, width)."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    return vae_config.latent_channels, size[0] // factor, size[1] // factor


def sound_moments(entry: dict | None, shape: tuple[int, ...]) -> bool:
    """Whether a cache entry is one the run can use: a mean and a std of the latent's shape, finite, the std >= 0.
    Anything else (another writer's format, a damaged or altered file) is encoded again."""
    if entry is None or set(entry) != {"mean", "std"}:
        return False
    tensors = entry.values()
    return (all(t.is_floating_point() and tuple(t.shape) == tuple(shape) and bool(torch.isfinite(t).all()) for t in tensors)
            and bool((entry["std"] >= 0).all()))


class RunLatents(TensorFiles):
    """RUN_DIR/cache/latents (--cache-dir none): one file per sample key as latent_key names it."""

    def keys(self, pixels: torch.Tensor, sample_keys: list[str]) -> list[str]:
        return list(sample_keys)

    def holds(self, sample_keys: list[str]) -> bool:
        """Whether every key has a file: checked before an image is decoded (a damaged one is encoded when read)."""
        return all(self.path(key).is_file() for key in sample_keys)

    def distinct(self, dataset) -> list[int]:
        return list(range(len(dataset)))  # each index has a key of its own


class SharedLatents(TensorFiles):
    """A folder shared by runs: one sub-folder per VAE identity, one file per distinct pixel tensor. The key is exact
    (the pixels are what the VAE sees), so a changed image, crop, flip, resolution or bucket is never matched to another's
    latent, and an image listed N times (kohya's N_name folders) is one entry. Writes are atomic (TensorFiles.put), so
    runs sharing it at once only ever read whole entries."""

    def __init__(self, root: Path, vae, dtype: torch.dtype):
        self.identity = vae_identity(vae, dtype)
        super().__init__(root / f"vae-{self.identity[:24]}")

    def keys(self, pixels: torch.Tensor, sample_keys: list[str]) -> list[str]:
        keys = []
        for image in pixels.detach().to("cpu", torch.float32).contiguous():
            digest = hashlib.sha256(f"{self.identity}\n{tuple(image.shape)}\n".encode())
            digest.update(image.numpy())
            keys.append(digest.hexdigest()[:40])
        return keys

    def holds(self, sample_keys: list[str]) -> bool:
        return False  # its keys need the pixels: each image is decoded, then looked up

    def distinct(self, dataset) -> list[int]:
        """The first index of each image file: repeats of an image show the same pixels, so are looked up once."""
        return sorted({path: index for index, path in reversed(list(enumerate(dataset.paths)))}.values())


def latent_store(cache_dir: str, run_folder: Path, vae, dtype: torch.dtype) -> RunLatents | SharedLatents:
    """The store of a run's latents: the shared folder --cache-dir names, or with none `run_folder`. Where the auto
    default cannot be written (a read-only home), one warning line and the run folder."""
    folder = cache_folder(cache_dir)
    if folder is not None and cache_dir == AUTO and (reason := unusable(folder)):
        from restune_sd.runfolder import main_process

        if main_process():
            warn(f"the shared latent cache {folder} cannot be used ({reason}): latents are kept in {run_folder} for this "
                 "run alone; pass --cache-dir a writable folder to share them between runs")
        folder = None
    return RunLatents(run_folder) if folder is None else SharedLatents(folder, vae, dtype)
