"""The CLI of the core: --help, info (text and JSON, presets and config files), bad input as one line."""

import json

from typer.testing import CliRunner

from restune_sd.cli.main import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "sample", "fid", "classify", "info", "init-tiny"):
        assert command in result.output


def test_info_json_on_the_real_sd15_architecture():
    result = runner.invoke(app, ["info", "--model", "sd15", "--tuner", "lora", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["tuner_params"] == 9_964_800  # the paper's LoRA row: r=50 on the 32 attentions
    assert summary["trainable_params"] == 9_964_800
    assert summary["total_params"] == 859_520_964 + 9_964_800
    assert len(summary["modules"]) == 128  # q, k, v, out of 32 attentions


def test_info_text_on_vit_b16_shows_breakdown():
    result = runner.invoke(app, ["info", "--model", "vit-b16", "--tuner", "res-tuning"])
    assert result.exit_code == 0, result.output
    assert "470,172" in result.output and "vit.layers.0.restune_ffn_input" in result.output


def test_info_with_a_config_file(tmp_path):
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"tuners": [{"kind": "res-adapter", "site": "ffn", "dim": 101}]}))
    result = runner.invoke(app, ["info", "--model", "sd15", "--config", str(config), "--json"])
    assert json.loads(result.output)["tuner_params"] == 2_535_056 + 16  # docs/method.md §3: 2.54M, plus 16 scales


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "nothing.json"
    config.write_text(json.dumps({"tuners": [{"kind": "res-adapter", "site": "ffn", "blocks": "nowhere"}]}))
    for args in (["info", "--model", "sd15", "--tuner", "magic"],
                 ["info", "--model", "sd15", "--config", str(config)],
                 ["info", "--model", str(tmp_path)],
                 ["info", "--model", "sd15", "--modules", "-1"],  # a slice [:-1] would drop the last row silently
                 ["init-tiny", str(tmp_path / "tiny"), "--seed", "-1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert "Traceback" not in result.output
    assert "'nowhere'" in runner.invoke(app, ["info", "--model", "sd15", "--config", str(config)]).stderr


def test_numbers_a_careless_user_passes_are_bounded_or_named(tmp_path):
    from conftest import one_error_line

    assert "--noise-offset" in one_error_line(["train", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"),
                                               "--noise-offset", "5"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "tiny").exists()
