"""Tiny backbones built from configs (no files, no downloads) and small helpers shared by the tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, num_labels=5)


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


def tiny_vit(seed: int = 0, **overrides):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**{**TINY_VIT, **overrides})).eval()


def unet_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)),
            torch.randn(batch, 7, 32, generator=g))


def vit_inputs(batch: int = 2, seed: int = 1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run(model, inputs):
    """The model's main output tensor for its inputs."""
    if isinstance(inputs, tuple):
        return model(*inputs).sample
    return model(pixel_values=inputs).logits


def perturb(model, seed: int = 3, std: float = 0.05):
    """Move every trainable parameter away from its (identity) initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


class RunsCode:
    """Pickles to a call that writes `marker`: loading it with weights_only=False would run that code."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))



def poison_weights_after(monkeypatch, bad_step: int, poison) -> None:
    """AdamW whose update at optimizer step `bad_step` (1-based) leaves the weights `poison(weights)`: a divergence on cue."""
    real_step, count = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == bad_step:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.copy_(poison(p))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def reseal(checkpoint) -> None:
    """Give an altered checkpoint a matching checksum, as someone who edits both files would."""
    from restune_sd.checkpoints import checksum_path, sha256_file

    checksum_path(Path(checkpoint)).write_text(sha256_file(Path(checkpoint)) + "\n")


def launched_in_two_processes(args: list[str], output, batch_size: int, tuner: str = "tuner") -> dict:
    """`restune-sd ARGS` run under `accelerate launch` as two CPU processes into `output`; the tensors of its tuner
    folder `tuner` (a sweep's: tuner/VARIANT)."""
    from safetensors.torch import load_file

    cli, accelerate = (str(Path(sys.executable).with_name(name)) for name in ("restune-sd", "accelerate"))
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", cli, *args, "--output", str(output), "--batch-size", str(batch_size)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((Path(output) / "results.json").read_text())["num_processes"] == 2
    return load_file(str(Path(output) / tuner / "tuner.safetensors"))


@pytest.fixture(autouse=True, scope="session")
def session_latent_cache(tmp_path_factory):
    """Module fixtures (set up before any test's own cache) use a cache folder of the session's, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-session")))
        yield


@pytest.fixture(autouse=True)
def own_latent_cache(tmp_path_factory, monkeypatch):
    """Each test's shared latent cache (--cache-dir auto) is a folder of its own: never the user's, nor another test's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD pipeline folder (diffusers layout), written once per test module."""
    from restune_sd.tiny import write_tiny_sd

    return str(write_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd"))


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A tiny random ViT classifier folder (transformers layout), written once per test module."""
    from restune_sd.tiny import write_tiny_vit

    return str(write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A `classfolder:` spec of six classes of coloured shapes, 8 images of 32 px each, written once per test module."""
    from restune_sd.datasets import make_synthetic_classification

    root = make_synthetic_classification("classfolder", tmp_path_factory.mktemp("data") / "shapes", num_classes=6,
                                         images_per_class=8, size=32)
    return f"classfolder:{root}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A `folder:` data spec of 4 generated captioned images, written once per test module."""
    from restune_sd.datasets import make_synthetic

    return f"folder:{make_synthetic('folder', tmp_path_factory.mktemp('data') / 'folder', num_classes=2, images_per_class=2)}"


def one_error_line(args: list[str]) -> str:
    """Run the CLI with `args` and check it failed as a user error: exit 2 and one `error: ...` line, no traceback."""
    from typer.testing import CliRunner

    from restune_sd.cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, lines
    return lines[0]
