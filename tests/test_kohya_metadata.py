"""A kohya-format LoRA export carries the `ss_*` training metadata and `sshs_*` hashes kohya's sd-scripts writes (what
A1111 and ComfyUI read), from the run's real values: tags counted from its captions, images with their repeats, its
resolution, model and times; the base model version follows the UNet's shape."""

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from restune_sd import TuningConfig, attach, save_tuner
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic
from restune_sd.kohya_metadata import base_model_version, with_hashes
from restune_sd.train import TrainConfig, train

runner = CliRunner()


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def tagged_kohya_data(root: Path) -> Path:
    """make_synthetic's kohya folders (N_name, N repeats) with every caption file rewritten as comma-separated tags in
    mixed case with an empty tag at the end; every fourth image keeps no caption file (its folder's name is its caption)."""
    root = make_synthetic("kohya", root, num_classes=2, images_per_class=4)
    for number, caption in enumerate(sorted(root.glob("*/*.txt"))):
        colour, shape = caption.parent.name.split("_", 1)[1].split()
        caption.write_text(f"{colour.title()}, {shape}, simple background, {'outline, ' if number % 2 else ''}")
    return root


def expected_tags(root: Path) -> dict[str, dict[str, int]]:
    """kohya's set_tag_frequency over the folders, computed here from the files: each image once, whatever its repeats."""
    found = {}
    for folder in sorted(root.iterdir()):
        counts = Counter()
        for image in folder.glob("*.png"):
            caption = image.with_suffix(".txt")
            text = caption.read_text() if caption.is_file() else folder.name.split("_", 1)[1]
            counts.update(tag.strip().lower() for tag in text.split(",") if tag.strip())
        found[folder.name] = dict(counts)
    return found


def test_a_kohya_export_of_a_trained_lora_carries_the_runs_metadata(tiny, tmp_path):
    root = tagged_kohya_data(tmp_path / "data")
    began = time.time()
    train(TrainConfig(model=tiny, data=f"kohya:{root}", tuner="lora-r4", output=str(tmp_path / "run"), max_steps=2,
                      batch_size=2, report_to="none"))
    ended = time.time()
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "style.safetensors")])
    assert result.exit_code == 0, result.output
    meta = metadata(tmp_path / "style.safetensors")
    tuner = json.loads((tmp_path / "run" / "tuner" / "tuner_config.json").read_text())
    lora = tuner["tuning"]["lora"]
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(lora["rank"]) == "4"
    assert float(meta["ss_network_alpha"]) == float(lora.get("alpha") or lora["rank"])
    assert meta["ss_base_model_version"] == "sd_v1"  # the tiny pipeline's 32-wide cross-attention: no SD 2 or SDXL
    assert meta["ss_resolution"] == "(64, 64)" and json.loads((tmp_path / "run" / "config.json").read_text())["resolution"] == 64
    repeats = sum(int(folder.name.split("_")[0]) * len(list(folder.glob("*.png"))) for folder in root.iterdir())
    assert meta["ss_num_train_images"] == str(repeats) and repeats > len(list(root.glob("*/*.png")))
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags == expected_tags(root)
    twice = next(folder for folder in tags if folder.startswith("2_"))  # its 4 images each drawn twice an epoch
    colour = twice.split("_", 1)[1].split()[0]
    assert tags[twice][colour] == 3 and tags[twice][twice.split("_", 1)[1]] == 1  # 3 caption files, 1 folder name
    assert meta["ss_sd_model_name"] == Path(tiny).name and meta["ss_output_name"] == "style"
    assert meta["ss_steps"] == "2"
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert began <= started <= finished <= ended

    data = (tmp_path / "style.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    training_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    save_file(load_file(tmp_path / "style.safetensors"), tmp_path / "kohya.safetensors", training_only)
    written = (tmp_path / "kohya.safetensors").read_bytes()  # as kohya hashes it: before the hashes join the metadata
    assert meta["sshs_legacy_hash"] == hashlib.sha256(written[0x100000:0x110000]).hexdigest()[:8]


def test_the_hashes_are_kohyas_on_a_file_past_one_mebibyte(tmp_path):
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(512, 600, generator=torch.Generator().manual_seed(0))}
    metadata_in = {"ss_network_dim": "4", "ss_output_name": "big"}
    hashed = with_hashes(tensors, metadata_in)
    save_file(tensors, tmp_path / "plain.safetensors", metadata_in)
    data = (tmp_path / "plain.safetensors").read_bytes()
    assert len(data) > 0x110000
    assert hashed["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert hashed["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    save_file(tensors, tmp_path / "final.safetensors", {**hashed, "user_note": "added later"})
    final = (tmp_path / "final.safetensors").read_bytes()
    assert hashed["sshs_model_hash"] == hashlib.sha256(final[8 + int.from_bytes(final[:8], "little"):]).hexdigest()


@pytest.mark.parametrize("config, prediction, expected", [
    ({"cross_attention_dim": 768}, "epsilon", "sd_v1"),
    ({"cross_attention_dim": 1024}, "epsilon", "sd_v2"),
    ({"cross_attention_dim": 1024}, "v_prediction", "sd_v2_v"),
    ({"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 56},
     "epsilon", "sdxl_base_v1-0"),  # SDXL's added embeddings, whatever the width
])
def test_base_model_version_follows_the_unet_config(config, prediction, expected):
    assert base_model_version(tiny_unet(**config).config, prediction) == expected


@pytest.mark.parametrize("width, expected", [(768, "sd_v1"), (1024, "sd_v2")])
def test_a_tuner_outside_a_run_exports_its_unets_version_and_no_run_keys(tmp_path, width, expected):
    unet = tiny_unet(cross_attention_dim=width)
    attach(unet, TuningConfig(name="lora", lora={"rank": 2, "alpha": 3.0}))
    save_tuner(unet, tmp_path / "tuner")
    result = runner.invoke(app, ["export", str(tmp_path / "tuner"), "--output", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.output
    meta = metadata(tmp_path / "out.safetensors")
    assert meta["ss_base_model_version"] == expected and meta["ss_network_alpha"] == "3.0"
    assert not {"ss_tag_frequency", "ss_sd_model_name", "ss_training_started_at"} & set(meta)


def test_a_run_record_restune_sd_did_not_write_is_left_out_with_one_warning(tiny, tmp_path):
    from test_lora_interop import trained_lora

    trained_lora(tiny, tmp_path / "run" / "tuner")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": tiny, "resolution": "big"}))
    (tmp_path / "run" / "results.json").write_text(json.dumps({"tag_frequency": {"dir": {"tag": "many"}},
                                                               "training_started_at": 5.0}))
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "config.json resolution" in warning[0] and "results.json tag_frequency" in warning[0]
    meta = metadata(tmp_path / "out.safetensors")
    assert meta["ss_sd_model_name"] == Path(tiny).name and meta["ss_training_started_at"] == "5.0"
    assert "ss_resolution" not in meta and "ss_tag_frequency" not in meta
