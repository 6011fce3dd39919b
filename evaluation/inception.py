"""torch-fidelity's Inception-v3, the network published FIDs use: loaded without running code a file carries,
identified by a digest of its weights (so statistics are only compared with those made by the same network), and a
seeded random stand-in for offline demos and tests."""

import hashlib
import io
import pickle
from pathlib import Path

import torch

from restune_sd.errors import UserError
from restune_sd.evaluation.fid_inputs import first_line as _first_line, require_device

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
EXTRACTOR_NAME, FEATURE = "inception-v3-compat", "2048"


def inception(weights=None, device=None) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 returning its 2048-d pool features, on `device` (default: CUDA if available).

    Without `weights` torch-fidelity downloads them into torch hub's cache as weights-inception-2015-12-05-6726825d.pth
    (its hash suffix is that of pytorch-fid's pt_inception-2015-12-05-6726825d.pth).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    device = require_device(device)
    if weights is None:
        try:
            extractor = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE], verbose=False)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad download is a RuntimeError
            raise UserError(f"cannot download torch-fidelity's Inception weights ({_first_line(error)}); pass "
                            f"--inception-weights FILE, a local copy of {INCEPTION_FILE}") from None
    else:
        # torch-fidelity loads the file with weights_only=False, which runs any code a pickle carries: it gets a
        # buffer holding only the tensors read here safely.
        buffer = io.BytesIO()
        torch.save(load_inception_state(weights), buffer)
        buffer.seek(0)
        try:
            extractor = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE], feature_extractor_weights_path=buffer)
        except Exception as error:  # torch.load and load_state_dict raise many types for a wrong file
            raise UserError(f"{weights} is not an Inception state dict torch-fidelity can load "
                            f"({_first_line(error)}); pass a local copy of {INCEPTION_FILE}") from None
    return extractor.to(device)


def load_inception_state(weights) -> dict:
    """An Inception state dict read with weights_only=True: a file that would run code is refused, not loaded."""
    if not Path(weights).is_file():
        raise UserError(f"Inception weights file {weights} does not exist; pass a local copy of {INCEPTION_FILE}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise UserError(f"Inception weights file {weights} holds objects that could run code when loaded, so it is "
                            f"not loaded; pass a local copy of {INCEPTION_FILE}") from None
        raise _not_inception(weights, error) from None
    except Exception as error:  # a truncated or foreign file: torch raises RuntimeError, EOFError, ...
        raise _not_inception(weights, error) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{weights} is not an Inception state dict; pass a local copy of {INCEPTION_FILE}")
    return state


def _not_inception(weights, error: Exception) -> UserError:
    return UserError(f"{weights} is not an Inception state dict torch-fidelity can load ({_first_line(error)}); pass a "
                     f"local copy of {INCEPTION_FILE}")


def inception_digest(extractor: torch.nn.Module) -> str:
    """The SHA-256 of the network's weights and buffers (names, dtypes, shapes and values), whatever file they came
    from: statistics record it, and statistics made by other weights are not compared with features from these."""
    digest = hashlib.sha256()
    for name, tensor in sorted(extractor.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_random_inception_weights(path, seed: int = 0) -> Path:
    """Write torch-fidelity's Inception-v3 with seeded random weights as a state dict for `--inception-weights`.

    For offline demos and tests only: it checks the FID pipeline end to end, but the figures it gives are not
    comparable to any published FID, which all use the trained pt_inception-2015-12-05 weights. Convolutions are
    He-normal and the batch norms' statistics come from one pass over seeded smooth noise, so the pool features
    keep their scale and still tell images apart. The same seed gives the same file; the global RNG is left as it was.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class InceptionSkeleton(FeatureExtractorInceptionV3):
        """The architecture alone: the constructor's weight loading is skipped."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):  # the layers' default initialisation draws from the global RNG
        model = InceptionSkeleton(EXTRACTOR_NAME, [FEATURE], feature_extractor_weights_path=empty)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=generator)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()
                module.momentum = None  # a cumulative average: one batch sets the statistics
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5, generator=generator)
                module.bias.zero_()
        # Batch norms calibrated on smooth random images centre every layer; without that, random ReLU layers
        # drift to features that are nearly the same for every image (correlation 0.999).
        smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=generator), size=64, mode="bicubic")
        model.train()(smooth.clamp(0, 1).mul(255).round().to(torch.uint8))
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
