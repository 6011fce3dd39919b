"""FID and KID of generated images against a reference (each a folder, COCO2017 val or saved statistics, ours or
pytorch-fid's), on torch-fidelity's Inception-v3 pool features, the ones published FIDs use.

How images reach Inception's 299x299 input, against the tools whose figures get compared:
- torch-fidelity and pytorch-fid feed images as they are (a folder of mixed sizes does not batch in
  torch-fidelity) and resize inside the network with bilinear interpolation and no antialiasing: torch-fidelity
  bit-exact to TensorFlow 1.x (the original TTUR FID), pytorch-fid with torch's `F.interpolate`; the two differ
  slightly unless images are already 299x299.
- Here generated images are used as they are too; reference images (COCO's are of many sizes) are first brought
  to the generated images' size by a bicubic, antialiased resize of the shorter side and a centre crop, so both
  sides reach Inception at one size. With the default `--resize legacy-tensorflow` Inception then resizes both as
  torch-fidelity does.
- `--resize clean` is clean-fid's "clean" mode: a PIL bicubic (antialiased) resize to 299x299 before Inception,
  so downsampling does not alias. clean-fid keeps the resized values in float; torch-fidelity's Inception takes
  uint8, so here they are rounded (at most 0.5/255 per pixel).
"""

import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from restune_sd.bounds import MAX_RESOLUTION, require_number
from restune_sd.errors import UserError
from restune_sd.evaluation.fid_inputs import (
    first_line as _first_line, image_paths, image_sizes, load_image, require_batch_size, require_device,
)
from restune_sd.evaluation.inception import (  # noqa: F401 (write_random_inception_weights: for callers)
    INCEPTION_FILE, inception, inception_digest, write_random_inception_weights,
)
from restune_sd.files import warn, write_reason
from restune_sd.runfolder import FolderLock

FEATURE_DIM = 2048
KID_SUBSET_SIZE = 1000
RESIZE_MODES = ("legacy-tensorflow", "clean")
FID_PROTOCOL_IMAGES = 5000  # docs/method.md §4: one image per COCO2017 val image, FID-5k
ONE_OF_STATISTICS = "a .npz of Inception pool statistics (pytorch-fid's mu and sigma, or one written by --save-stats)"


@dataclass
class Statistics:
    """What FID needs from one image set; `features` ([n, 2048] float32) only when KID needs them too.

    `num_images`, `resize`, `resolution` (the side the images were brought to) and `inception` (the digest of the
    network's weights, `inception_digest`) are None for a file that does not record them (pytorch-fid's holds mu and
    sigma alone; ours from before they were recorded lack `resolution` or `inception`).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None
    features: np.ndarray | None = None
    resize: str | None = None
    resolution: int | None = None
    inception: str | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, keep_features: bool = False, resize: str | None = None,
                      resolution: int | None = None, inception: str | None = None) -> "Statistics":
        features64 = features.astype(np.float64)
        return cls(mu=features64.mean(axis=0), sigma=np.cov(features64, rowvar=False), num_images=len(features),
                   features=features if keep_features else None, resize=resize, resolution=resolution,
                   inception=inception)


class StatisticsNotSaved(UserError):
    """The FID was computed but its reference statistics could not be written; `result` holds the figures."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def fewer_than_protocol(count: int, what: str) -> str:
    """The one line said when an FID run uses fewer images than the protocol's."""
    return (f"{count:,} images {what}, fewer than the {FID_PROTOCOL_IMAGES:,} of the FID protocol (docs/method.md §4): "
            "FID from fewer images is biased upward, so compare it only with figures from as many images")


def save_statistics(path, stats: Statistics) -> Path:
    """Write `stats` to a new .npz file (an existing file is never overwritten, a failed write leaves no file)."""
    path = new_statistics_path(path)
    arrays = dict(mu=stats.mu, sigma=stats.sigma)
    optional = dict(num_images=stats.num_images, features=stats.features, resize=stats.resize,
                    resolution=stats.resolution, inception=stats.inception)
    arrays.update({key: np.asarray(value) for key, value in optional.items() if value is not None})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as file:
            np.savez(file, **arrays)
        os.link(tmp, path)  # a link, not a rename: it refuses a file that appeared since the check
    except FileExistsError:
        raise _exists(path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def new_statistics_path(path) -> Path:
    """`path` if a statistics file may be written there: a .npz name that is not taken."""
    path = Path(path)
    if path.exists():
        raise _exists(path)
    if path.suffix != ".npz":
        raise UserError(f"statistics file {path} must end in .npz; give a name like {path.with_suffix('.npz').name}")
    return path


def load_statistics(path) -> Statistics:
    """Read a .npz of Inception statistics: one written by `save_statistics` (or `restune-sd fid --save-stats`), or
    pytorch-fid's (`mu`, `sigma`). Read without pickle; a damaged or foreign file is one UserError line."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"statistics file {path} is not a .npz archive (damaged, or another format); give {ONE_OF_STATISTICS}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
        num_images = int(arrays["num_images"]) if "num_images" in arrays else None
        resize = str(arrays["resize"]) if "resize" in arrays else None
        resolution = int(arrays["resolution"]) if "resolution" in arrays else None
        digest = str(arrays["inception"]) if "inception" in arrays else None
    except KeyError as error:
        raise UserError(f"statistics file {path} has no {error.args[0]} array; give {ONE_OF_STATISTICS}") from None
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise UserError(f"cannot read statistics file {path} ({_first_line(error)}); give {ONE_OF_STATISTICS}") from None
    features = arrays.get("features")
    if (mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM)
            or (features is not None and features.shape[1:] != (FEATURE_DIM,))):
        raise UserError(f"statistics file {path} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}, not "
                        f"the ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}) of Inception's pool features (or "
                        "its features are not n x 2048); recompute them with `restune-sd fid ... --save-stats FILE.npz`")
    return Statistics(mu=mu, sigma=sigma, num_images=num_images, features=features, resize=resize, resolution=resolution,
                      inception=digest)


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)) in float64."""
    # Tr sqrt(S_a S_b) = Tr sqrt(R S_b R) with R = sqrt(S_a): S_a S_b = R (R S_b) has the eigenvalues of (R S_b) R.
    # Two symmetric eigendecompositions are exact for the singular covariances of small sets and ~10x faster on CPU
    # than scipy's sqrtm of the non-symmetric product, which needs an eps offset when that product is singular.
    root_a = _psd_sqrt(a.sigma)
    tr_covmean = np.sqrt(_zero_round_off(np.linalg.eigvalsh(root_a @ b.sigma @ root_a))).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, basis = np.linalg.eigh(matrix)
    return (basis * np.sqrt(_zero_round_off(values))) @ basis.T


def _zero_round_off(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those under eigh's round-off floor (negative ones included) set to 0."""
    floor = max(values.max(), 0.0) * len(values) * np.finfo(values.dtype).eps
    return np.where(values > floor, values, 0.0)


def kernel_distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """KID (mean, std) by torch-fidelity over 100 subsets of min(1000, n) images from each side."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    subset = min(KID_SUBSET_SIZE, len(a), len(b))
    kid = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subset_size=subset, verbose=False)
    return kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]


def compute_fid(generated, reference, *, save_stats=None, **options) -> dict:
    """FID (and KID) of `generated` against `reference` (see `fid_and_statistics`); with `save_stats`, one command at
    a time computes statistics for that name: a second one is refused at once, not after minutes of Inception."""
    if save_stats is None:
        return fid_and_statistics(generated, reference, **options)
    path = Path(save_stats)
    with FolderLock(path.parent, "--save-stats", name=f".{path.name}.lock"):
        return fid_and_statistics(generated, reference, save_stats=path, **options)


def fid_and_statistics(generated, reference, *, kid: bool = False, inception_weights=None, device=None,
                       batch_size: int = 50, save_stats=None, resolution: int | None = None,
                       resize: str = "legacy-tensorflow") -> dict:
    """FID (and KID) of `generated` against `reference`.

    Each side is a folder of images or a .npz of statistics (ours or pytorch-fid's); `reference` may also be
    `coco:ROOT` (every image of ROOT/val2017). Generated images are used as they are and must all share one size;
    reference images are brought to `resolution` x `resolution` (default: the generated images' side, the shorter
    one if they are not square) by a bicubic resize of the shorter side and a centre crop. `resize` is how both then
    reach Inception's 299x299 (one of RESIZE_MODES; the module docstring compares them). `save_stats` writes the
    reference's statistics to a new .npz (with the features when `kid` is set, so that the file can serve KID later),
    with the side its images were brought to: statistics are only compared at the size they were made at.
    """
    require_batch_size(batch_size)
    device = require_device(device)
    if resize not in RESIZE_MODES:
        raise UserError(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    if resolution is not None:
        require_number("--resolution", resolution, minimum=1, maximum=MAX_RESOLUTION, integer=True)
    if save_stats is not None:
        save_stats = new_statistics_path(save_stats)  # checked now, not after minutes of Inception
    generated_stats, generated_paths = resolve_side(generated, "generated", kid, resize)
    if generated_paths is not None:
        resolution = resolution or generated_side(generated, generated_paths)
    reference_stats, reference_paths = resolve_side(reference, "reference", kid, resize)
    for path, stats in ((generated, generated_stats), (reference, reference_stats)):
        if stats is not None:
            resolution = resolution or stats.resolution
            require_made_at(path, stats, resolution)
    if reference_paths is not None:
        image_sizes(reference_paths)  # an unreadable file fails now, before the network is built
        if resolution is None:
            raise UserError(f"the generated side {generated} is a statistics file, so the size to bring the reference "
                            "images to is unknown; pass --resolution (the generated images' side)")

    needs_images = generated_paths is not None or reference_paths is not None
    extractor = inception(inception_weights, device) if needs_images else None
    digest = inception_digest(extractor) if extractor is not None else None
    require_same_inception([(generated, generated_stats), (reference, reference_stats)], digest)
    if generated_stats is None:
        generated_stats = statistics_of(extractor, generated_paths, batch_size, "generated", kid, resize, None, digest)
    if reference_stats is None:
        reference_stats = statistics_of(extractor, reference_paths, batch_size, "reference", kid, resize, resolution,
                                        digest)
    for label, stats in (("generated", generated_stats), ("reference", reference_stats)):
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            raise UserError(f"the {label} images' Inception features are not finite, so FID would be NaN; check "
                            f"--inception-weights (a local copy of {INCEPTION_FILE}) and the statistics file")
    result = {"fid": frechet_distance(generated_stats, reference_stats),
              "num_generated": generated_stats.num_images, "num_reference": reference_stats.num_images}
    counts = {n: side for side, n in (("in the reference", result["num_reference"]), ("generated", result["num_generated"]))
              if n is not None}
    if counts and min(counts) < FID_PROTOCOL_IMAGES:  # one line, for the smaller side
        warn(fewer_than_protocol(min(counts), counts[min(counts)]))
    if kid:
        result["kid_mean"], result["kid_std"] = kernel_distance(generated_stats.features, reference_stats.features)
    broken = [key for key in ("fid", "kid_mean", "kid_std") if key in result and not math.isfinite(result[key])]
    if broken:
        raise UserError(f"{broken[0]} came out {result[broken[0]]}: the Inception features are not finite; check "
                        f"--inception-weights (a local copy of {INCEPTION_FILE}) and the images")
    if save_stats is not None:
        try:
            save_statistics(save_stats, reference_stats)
        except OSError as error:
            raise StatisticsNotSaved(f"cannot write statistics file {save_stats} ({write_reason(error)}); the FID above "
                                     "was computed, but no statistics file was left", result) from None
    return result


def generated_side(folder, paths: list[Path]) -> int:
    """The side reference images are brought to: the generated images' (the shorter one), which must share one size."""
    sizes = image_sizes(paths)
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:5])
        raise UserError(f"generated images in {folder} have mixed sizes ({shown}); generate them all at one size")
    return min(next(iter(sizes)))


def require_made_at(path, stats: Statistics, resolution: int | None) -> None:
    """Statistics of images at `resolution` px, as far as the file can tell: pytorch-fid's record no size at all."""
    ours = stats.num_images is not None
    if ours and stats.resolution is None:
        raise UserError(f"statistics file {path} records no image size (an older restune-sd wrote it), so it cannot "
                        f"be checked against the {resolution or 'other side'} px images here; rebuild it from the "
                        "reference images with `restune-sd fid GENERATED REFERENCE --save-stats NEW.npz`")
    if stats.resolution is not None and resolution is not None and stats.resolution != resolution:
        raise UserError(f"statistics file {path} was made from images brought to {stats.resolution}x{stats.resolution} "
                        f"px, not the {resolution}x{resolution} px compared here (the generated images' size, or "
                        f"--resolution): use statistics made at {resolution} px (`restune-sd fid GENERATED REFERENCE "
                        f"--save-stats NEW.npz`), or images of {stats.resolution} px")


def require_same_inception(sides: list[tuple], digest: str | None) -> None:
    """Statistics files made by the network computing features now (`digest`; None when both sides are files, then
    by the same network as each other). Features of other weights live in another space: their FID means nothing."""
    recorded = [(path, stats.inception) for path, stats in sides if stats is not None and stats.inception]
    expected = digest or (recorded[0][1] if recorded else None)
    for path, made_with in recorded:
        if made_with != expected:
            now = "--inception-weights given now" if digest else "other side's statistics"
            raise UserError(f"statistics file {path} was made with other Inception weights (digest {made_with[:12]}) "
                            f"than the {now} ({expected[:12]}), so the two cannot be compared: pass the weights it was "
                            "made with, or rebuild it (`restune-sd fid GENERATED REFERENCE --save-stats NEW.npz`)")
    unchecked = [str(path) for path, stats in sides if stats is not None and stats.num_images and not stats.inception]
    if unchecked:
        warn(f"statistics file {unchecked[0]} records no Inception digest (an older restune-sd wrote it): it is taken "
             "to be made with the same weights; rebuild it with --save-stats to have that checked")


def statistics_of(extractor, paths: list[Path], batch_size: int, label: str, kid: bool, resize: str,
                  resolution: int | None = None, digest: str | None = None) -> Statistics:
    features = extract_features(extractor, paths, batch_size, label, resolution, resize)
    return Statistics.from_features(features, keep_features=kid, resize=resize, resolution=resolution, inception=digest)


def resolve_side(spec, side: str, kid: bool = False, resize: str = "legacy-tensorflow"
                 ) -> tuple[Statistics | None, list[Path] | None]:
    """One side of the comparison: its saved statistics, or the paths of a folder's images (or, for the reference,
    of coco:ROOT's val2017)."""
    accepted = "a folder of images, " + ("coco:ROOT, " if side == "reference" else "") + "or " + ONE_OF_STATISTICS
    if side == "reference" and str(spec).startswith("coco:"):
        root = Path(str(spec)[len("coco:"):])
        if not (root / "val2017").is_dir():
            raise UserError(f"COCO2017 root {root} has no val2017 folder; give coco:ROOT where ROOT/val2017 holds the images")
        return None, image_paths(root / "val2017", side)
    if Path(spec).is_file():
        if Path(spec).suffix != ".npz":
            raise UserError(f"{side} {spec} is a file but not a .npz of statistics; give {accepted}")
        return checked_statistics(spec, kid, resize), None
    if not Path(spec).exists():
        raise UserError(f"{side} {spec} does not exist; give {accepted}")
    return None, image_paths(spec, side)


def checked_statistics(path, kid: bool, resize: str) -> Statistics:
    """A statistics file that can serve this comparison: with features if KID is asked, made with the same resize."""
    stats = load_statistics(path)
    if kid and stats.features is None:
        raise UserError(f"statistics file {path} has no features, which KID needs; drop --kid, or save the "
                        "statistics again with --kid --save-stats")
    if stats.resize not in (None, resize):
        raise UserError(f"statistics file {path} was computed with --resize {stats.resize}; pass --resize "
                        f"{stats.resize}, or recompute it with --resize {resize}")
    return stats


@torch.no_grad()
def extract_features(extractor, paths: list[Path], batch_size: int, label: str, resolution: int | None = None,
                     resize: str = "legacy-tensorflow") -> np.ndarray:
    """The [n, 2048] float32 pool features of `paths`, decoded in threads, batched, with a progress bar."""
    device = next(extractor.parameters()).device
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    features = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for batch in tqdm(batches, desc=f"Inception features ({label})", unit="batch"):
            images = torch.stack(list(pool.map(lambda path: load_image(path, resolution, resize), batch)))
            features.append(extractor(images.to(device))[0].cpu())
    return torch.cat(features).numpy()


def _exists(path: Path) -> UserError:
    return UserError(f"statistics file {path} already exists; remove it or choose another --save-stats name")
