"""Tuner configs a user receives or mistypes (issue 8): wrong types, empty or non-mapping files, sizes that would
exhaust memory and blocks patterns that could backtrack without end are each one line, at once."""

import json

import pytest
from typer.testing import CliRunner

from restune_sd.cli.main import app

runner = CliRunner()

CASES = {
    "float dim": ("tuners: [{kind: res-adapter, site: ffn, dim: 1.5}]", "dim must be a whole number"),
    "bool dim": ("tuners: [{kind: res-adapter, site: ffn, dim: true}]", "dim must be a whole number"),
    "string dim": ("tuners: [{kind: res-adapter, site: ffn, dim: ten}]", "dim must be a whole number"),
    "empty file": ("", "is empty"),
    "a list": ("- {kind: res-adapter, site: ffn}", "holds a list"),
    "groups not dividing the width": ("tuners: [{kind: res-adapter, site: ffn, dim: 96, groups: 3}]", "groups=3 must divide"),
    "groups not dividing dim": ("tuners: [{kind: res-adapter, site: ffn, dim: 97, groups: 4}]", "groups=4 must divide dim=97"),
    "NaN scale": ("tuners: [{kind: res-prefix, site: self_attn, scale: .nan}]", "scale must be"),
    "huge dim": ("tuners: [{kind: res-adapter, site: ffn, dim: 2000000000}]", "dim must be between 1 and 4096"),
    "huge LoRA rank": ("lora: {rank: 2000000}", "rank must be between 1 and 1024"),
    "huge bypass": ("bypass: {bottleneck: 1000000}", "bottleneck must be between 0 and 4096"),
    "string flag": ("full: 'yes'", "full must be true or false"),
    "nested repeat": ("tuners: [{kind: res-adapter, site: ffn, blocks: '(.*)*x'}]", "nests one repeat inside another"),
    "repeated alternation": ("tuners: [{kind: res-adapter, site: ffn, blocks: '(a|ab)*c'}]", "repeats an alternation"),
    "many repeats": ("tuners: [{kind: res-adapter, site: ffn, blocks: '.*.*.*.*.*.*.*.*.*.*.*.*.*.*.*.*.*.*x'}]",
                     "variable repeats"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_tuner_config_is_one_line(tmp_path, case):
    text, expected = CASES[case]
    config = tmp_path / "tuner.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["info", "--model", "sd15", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    assert expected in lines[0]


def test_a_json_config_with_a_float_size_is_one_line(tmp_path):
    config = tmp_path / "tuner.json"
    config.write_text(json.dumps({"tuners": [{"kind": "res-adapter", "site": "ffn", "dim": 2e9}]}))
    result = runner.invoke(app, ["info", "--model", "sd15", "--config", str(config)])
    assert result.exit_code == 2 and "dim must be a whole number" in result.stderr


def test_patterns_people_write_still_work(tmp_path):
    config = tmp_path / "tuner.yaml"
    config.write_text("tuners:\n  - {kind: res-prefix, site: self_attn, dim: 8, blocks: '(down|up)_blocks\\..*'}\n"
                      "  - {kind: res-adapter, site: ffn, dim: 64, blocks: '.*attentions\\.[01].*'}\n")
    result = runner.invoke(app, ["info", "--model", "sd15", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tuner_params"] > 0
