"""restune_sd.tiny: tiny SD pipelines and ViTs on disk load offline, run, and are the same bytes for the same seed."""

import hashlib
from pathlib import Path

import pytest
import torch

from restune_sd.errors import UserError
from restune_sd.tiny import TINY_SD_RESOLUTION, TINY_VIT_RESOLUTION, write_tiny_sd, write_tiny_vit


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.mark.parametrize("write", [write_tiny_sd, write_tiny_vit])
def test_same_seed_same_bytes_and_other_seed_other_weights(tmp_path, write):
    rng_before = torch.get_rng_state()
    first, again, other = write(tmp_path / "first"), write(tmp_path / "again"), write(tmp_path / "other", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert file_hashes(first) == file_hashes(again)
    changed = {name for name, digest in file_hashes(first).items() if file_hashes(other)[name] != digest}
    assert changed and all(name.endswith(".safetensors") for name in changed)


def test_sd_pipeline_loads_offline_and_generates(tiny_sd, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention import BasicTransformerBlock

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    image = pipeline("a photo of a dog", num_inference_steps=2, height=TINY_SD_RESOLUTION, width=TINY_SD_RESOLUTION,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    unet = pipeline.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert [b.resnets[-1].out_channels for b in unet.up_blocks] == [64, 64, 32, 16]

    def transformer_blocks(module):
        return sum(isinstance(m, BasicTransformerBlock) for m in module.modules())

    # layers_per_block=1: one per down block, one in the mid block, two (layers + 1) per up block.
    assert [transformer_blocks(b) for b in unet.down_blocks] == [1, 1, 1, 0]
    assert transformer_blocks(unet.mid_block) == 1
    assert [transformer_blocks(b) for b in unet.up_blocks] == [0, 2, 2, 2]
    assert transformer_blocks(unet) == 10


def test_tokenizer_round_trips_and_pads(tiny_sd):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    ids = tokenizer("a photo of a dog").input_ids
    assert len(ids) == 2 + 5  # start, one token per word, end
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a dog"
    padded = tokenizer("a photo of a dog", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77 and padded[:7] == ids
    unknown_word = tokenizer("xylophonist Ünïcode").input_ids
    assert tokenizer.decode(unknown_word, skip_special_tokens=True) == "xylophonist ünïcode"


def test_vit_loads_offline_and_classifies(tmp_path, monkeypatch):
    from transformers import ViTForImageClassification, ViTImageProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_tiny_vit(tmp_path / "vit", num_labels=7)
    model = ViTForImageClassification.from_pretrained(folder).eval()
    assert model.config.id2label[6] == "class_6" and model.config.label2id["class_0"] == 0
    pixels = torch.randn(2, 3, TINY_VIT_RESOLUTION, TINY_VIT_RESOLUTION, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(pixel_values=pixels).logits.shape == (2, 7)
    assert ViTImageProcessor.from_pretrained(folder).size == {"height": 32, "width": 32}


@pytest.mark.parametrize("write", [write_tiny_sd, write_tiny_vit])
def test_refuses_non_empty_folder(tmp_path, write):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an empty folder"):
        write(tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == ["notes.txt"]
    assert write(tmp_path / "new") == tmp_path / "new"
