"""`restune-sd bench` on the tiny models: every figure present and positive, ratios the quotients of the figures,
the train-CLI path measured, and bad input refused before anything runs. The figures themselves are not asserted."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from restune_sd.cli.main import app
from restune_sd.tiny import write_tiny_sd, write_tiny_vit

runner = CliRunner()
QUICK = ["--steps", "1", "--warmup", "1", "--sample-steps", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"sd": write_tiny_sd(root / "sd"), "vit": write_tiny_vit(root / "vit")}


def bench(kind, model, output, *more):
    ran = runner.invoke(app, ["bench", kind, "--model", str(model), "--output", str(output), *QUICK, *more])
    assert ran.exit_code == 0, ran.output
    return json.loads((output / "results.json").read_text())


def check_figures(result, speed_key, library_rows):
    rows = {row["contender"]: row for row in result["rows"]}
    assert list(rows) == library_rows + [name for name in rows if name not in library_rows]
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["trainable_params"] > 0 and row["peak_mb"] > 0
        assert 0 < row["step_seconds_min"] <= row["step_seconds"] <= row["step_seconds_max"]
        if name in library_rows:
            assert row["weights_mb"] > 0 and row[speed_key] > 0 and row[f"bare_{speed_key}"] > 0
            assert row["above_weights_mb"] == pytest.approx(row["peak_mb"] - row["weights_mb"])
        suffix = name.removeprefix(name.split(" ")[0])  # "" or " (train CLI)": ratios stay on one path
        for base in ("lora", "full"):
            reference = rows[base + suffix]
            ratios = row[f"ratio_to_{base}"]
            assert {"trainable_params", "peak_mb", "step_seconds"} <= set(ratios)
            for key, ratio in ratios.items():
                assert ratio == pytest.approx(row[key] / reference[key]), (name, base, key)
    return rows


def check_files(output, rows):
    table = (output / "results.md").read_text()
    for name in rows:
        assert f"| {name} |" in table
    with Image.open(output / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width > 100


def test_bench_sd_library_and_train_cli(tiny, tmp_path):
    output = tmp_path / "sd"
    result = bench("sd", tiny["sd"], output, "--tuners", "lora,full", "--through-cli")
    rows = check_figures(result, "sample_seconds_per_image", ["lora", "full"])
    assert set(rows) == {"lora", "full", "lora (train CLI)", "full (train CLI)"}
    # full trains every UNet weight, LoRA far fewer; the train CLI counts the same parameters as the library.
    from restune_sd.models import load_unet

    assert rows["full"]["trainable_params"] == sum(p.numel() for p in load_unet(str(tiny["sd"])).parameters())
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    for name in ("lora", "full"):
        assert rows[f"{name} (train CLI)"]["trainable_params"] == rows[name]["trainable_params"]
    assert result["environment"]["command"].startswith("restune-sd bench sd --output")
    assert result["paper"]["memory_gb"]["bypass"] == 21.35
    check_files(output, rows)

    again = runner.invoke(app, ["bench", "sd", "--model", str(tiny["sd"]), "--output", str(output), *QUICK])
    assert again.exit_code == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert json.loads((output / "results.json").read_text()) == result


def test_bench_vit(tiny, tmp_path):
    result = bench("vit", tiny["vit"], tmp_path / "vit", "--tuners", "full,lora,linear", "--batch", "2")
    rows = check_figures(result, "images_per_second", ["full", "lora", "linear"])
    assert rows["linear"]["trainable_params"] < rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    check_files(tmp_path / "vit", rows)


@pytest.mark.parametrize("args, phrase", [
    (["sd", "--tuners", "lora,nope"], "--tuners must name distinct presets"),
    (["vit", "--tuners", "lora,lora"], "--tuners must name distinct presets"),
    (["sd", "--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["sd", "--precision", "fp8"], "unknown --precision"),
    (["vit", "--through-cli"], "drop it for vit"),
    (["sd", "--model", "vit-b16"], "is not an SD backbone"),
    (["sd", "--model", "no/such/folder"], "nor an existing model folder"),
    (["sd", "--resolution", "100", "--model", "sd15"], "multiple of 8"),
    (["sd", "--batch", "0"], "--batch"),
    (["sd", "--attention", "xformers", "--device", "cpu"], "xformers attention needs CUDA"),
    (["vit", "--attention", "sdpa"], "drop it for vit"),
    (["sd", "--device", "nowhere"], "cannot use device 'nowhere'"),
    (["banana"], "use sd or vit"),
])
def test_bad_input_is_one_line_before_anything_runs(args, phrase, tmp_path):
    output = tmp_path / "out"
    ran = runner.invoke(app, ["bench", *args, "--output", str(output)])
    assert ran.exit_code == 2, ran.output
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0] and "Traceback" not in ran.output, lines
    assert not output.exists()


def test_a_model_of_the_other_kind_is_refused(tiny, tmp_path):
    ran = runner.invoke(app, ["bench", "sd", "--model", str(tiny["vit"]), "--output", str(tmp_path / "out")])
    assert ran.exit_code == 2 and "not a Stable Diffusion model folder" in ran.stderr, ran.output



@pytest.fixture(scope="module")
def lora_r4_bench(tiny, tmp_path_factory):
    """A bench with `lora-r4` but no `lora`: its results and its results.md."""
    output = tmp_path_factory.mktemp("bench") / "r4"
    return bench("sd", tiny["sd"], output, "--tuners", "lora-r4,bypass"), (output / "results.md").read_text()


def test_without_lora_the_lora_columns_divide_by_the_lora_that_ran_and_say_so(lora_r4_bench):
    result, table = lora_r4_bench
    rows = {row["contender"]: row for row in result["rows"]}
    header = next(line for line in table.splitlines() if line.startswith("| contender |"))
    assert header.count("÷ lora-r4") == 3 and "÷ LoRA" not in header
    cells = next(line for line in table.splitlines() if line.startswith("| bypass |")).split(" | ")
    memory = rows["bypass"]["above_weights_mb"] / rows["lora-r4"]["above_weights_mb"]
    step = rows["bypass"]["step_seconds"] / rows["lora-r4"]["step_seconds"]
    assert cells[4] == f"{memory:.2f}" and cells[9] == f"{step:.2f}", cells
    assert "÷ lora-r4: no `lora` contender ran" in table and "÷ full: no `full` contender ran" in table


def test_with_no_lora_at_all_the_table_says_why_its_column_is_empty(lora_r4_bench):
    from restune_sd.evaluation.bench_report import markdown

    result, _ = lora_r4_bench
    table = markdown({**result, "rows": [row for row in result["rows"] if row["contender"] == "bypass"]})
    assert "| — | — |" in table and "÷ LoRA: no LoRA contender ran in this bench" in table and "--tuners" in table



def test_a_peak_count_starts_from_what_is_live_not_what_was_freed():
    """Small tensors freed by an earlier phase (sampling) stay in the C heap's resident pages unless handed back;
    `reset_peak` hands them back, so the resident baseline the next peak counts from drops."""
    import torch

    from restune_sd.evaluation.bench_child import reset_peak, rss_mb

    chunks = [torch.ones(16_000) for _ in range(4_000)]  # 64 KB each, under malloc's mmap threshold: heap pages
    keep = chunks[::400]  # a few live ones scattered through the heap, so trimming its top alone frees little
    held = rss_mb()
    del chunks
    freed_only = rss_mb()
    reset_peak(torch.device("cpu"))
    counted_from = rss_mb()
    assert held - freed_only < 50  # freeing alone leaves the pages resident (measured: 0 MB of 250 MB)
    assert freed_only - counted_from > 150, (held, freed_only, counted_from)  # measured: 245 MB handed back
    assert all(chunk.sum() == 16_000 for chunk in keep)  # the live ones are untouched
