"""Each ViT preset's VTAB-1K recipe (docs/method.md §4): the defaults it fills, flags that beat it (even at the old
default), and the --vtab-all sweep recording the recipe's values among its settings."""

import json

import pytest
from typer.testing import CliRunner

from restune_sd.classify import ClassifyConfig
from restune_sd.cli.main import app
from restune_sd.datasets import make_synthetic_classification
from restune_sd.recipes import VIT_RECIPES
from restune_sd.tiny import write_tiny_vit
from restune_sd.vtab import sweep_settings

runner = CliRunner()
# (learning rate, max grad norm) each preset's row was produced with; 0 is no clipping.
EXPECTED = {"adapter": (5e-3, 0.0), "lora": (5e-3, 0.0), "prompt": (1e-3, 0.0), "res-tuning": (1e-3, 1.0),
            "res-tuning-s1": (1e-3, 1.0),
            "bypass": (1e-3, 1.0), "prefix": (1e-3, 1.0), "full": (1e-3, 1.0), "linear": (1e-3, 1.0)}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return str(write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit"))


def test_every_vit_preset_has_its_rows_recipe():
    from restune_sd.config import preset_names

    assert set(VIT_RECIPES) == set(preset_names("vit"))
    for tuner, (learning_rate, clip) in EXPECTED.items():
        cfg = ClassifyConfig(model="m", data="d", output="o", tuner=tuner)
        assert (cfg.learning_rate, cfg.max_grad_norm) == (learning_rate, clip), tuner
        assert VIT_RECIPES[tuner].source


def test_a_given_setting_beats_the_recipe_even_at_the_old_default():
    cfg = ClassifyConfig(model="m", data="d", output="o", tuner="adapter", learning_rate=1e-3, max_grad_norm=1.0)
    assert (cfg.learning_rate, cfg.max_grad_norm) == (1e-3, 1.0)
    assert ClassifyConfig(model="m", data="d", output="o", tuner="my.yaml").learning_rate == 1e-3  # a config file


def test_the_cli_trains_with_the_recipe_unless_a_flag_is_given(vit, tmp_path):
    root = make_synthetic_classification("classfolder", tmp_path / "data", num_classes=2, images_per_class=4, size=32)
    base = ["classify", "train", "--model", vit, "--data", f"classfolder:{root}", "--tuner", "lora", "--max-steps", "1",
            "--batch-size", "2", "--warmup-epochs", "0", "--report-to", "none"]
    for name, flags, expected in (("recipe", [], (5e-3, 0.0)),
                                  ("given", ["--learning-rate", "1e-3", "--max-grad-norm", "1.0"], (1e-3, 1.0))):
        ran = runner.invoke(app, [*base, "--output", str(tmp_path / name), *flags])
        assert ran.exit_code == 0, ran.output
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert (saved["learning_rate"], saved["max_grad_norm"]) == expected


def test_the_vtab_sweep_records_the_recipe_and_refuses_another(vit, tmp_path):
    cfg = ClassifyConfig(model=vit, data="vtab:", output="o", tuner="adapter")
    settings = sweep_settings(cfg)
    assert (settings["learning_rate"], settings["max_grad_norm"]) == (5e-3, 0.0)
    make_synthetic_classification("vtab", tmp_path / "vtab", num_classes=4, images_per_class=4, size=32, task="kitti")
    sweep = ["classify", "eval", "--model", vit, "--vtab-all", str(tmp_path / "vtab"), "--output", str(tmp_path / "out"),
             "--preset", "adapter", "--max-steps", "1", "--batch-size", "4"]
    assert runner.invoke(app, sweep).exit_code == 0
    table = json.loads((tmp_path / "out" / "vtab.json").read_text())
    assert (table["settings"]["learning_rate"], table["settings"]["max_grad_norm"]) == (5e-3, 0.0)
    assert runner.invoke(app, sweep).exit_code == 0  # the same sweep reuses its task
    other = runner.invoke(app, [*sweep, "--max-grad-norm", "1.0"])
    assert other.exit_code == 2 and "max_grad_norm=0.0, not 1.0" in other.stderr
