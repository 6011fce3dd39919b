"""`restune-sd fid` and the data readers against hostile weights, a full disk, non-finite figures and 16-bit or
float images (issue 8)."""

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import RunsCode
from restune_sd.cli.main import app
from restune_sd.datasets import CaptionDataset
from restune_sd.evaluation.fid import load_image, write_random_inception_weights

runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("generated", "reference"):
        (root / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0]


def test_inception_weights_that_would_run_code_are_never_loaded(folders, weights, tmp_path):
    marker = tmp_path / "marker"
    hostile = tmp_path / "inception.pth"
    torch.save({**torch.load(weights, weights_only=True), "payload": RunsCode(marker)}, hostile)
    message = one_error_line(runner.invoke(app, ["fid", str(folders / "generated"), str(folders / "reference"),
                                                 "--inception-weights", str(hostile), "--device", "cpu"]))
    assert "could run code" in message and not marker.exists()


def test_a_full_disk_prints_the_fid_and_leaves_no_statistics_file(folders, weights, tmp_path, monkeypatch):
    def disk_fills_up(file, **arrays):
        file.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_fills_up)
    stats = tmp_path / "reference.npz"
    result = runner.invoke(app, ["fid", str(folders / "generated"), str(folders / "reference"), "--json",
                                 "--inception-weights", str(weights), "--device", "cpu", "--save-stats", str(stats)])
    assert "no space left on device" in one_error_line(result)
    assert json.loads(result.stdout)["num_generated"] == 4  # the figure that took minutes is not lost
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_fid_is_an_error_not_json(folders, weights, tmp_path):
    broken = tmp_path / "nan-inception.pth"
    state = torch.load(weights, weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, broken)
    result = runner.invoke(app, ["fid", str(folders / "generated"), str(folders / "reference"), "--json",
                                 "--inception-weights", str(broken), "--device", "cpu"])
    assert "not finite" in one_error_line(result) and "NaN" not in result.stdout


def test_16_bit_and_float_images_keep_their_brightness(tmp_path):
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(gray16)
    gray_float = tmp_path / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(gray_float)
    for path in (gray16, gray_float):
        assert load_image(path).unique().tolist() == [128]
        item = CaptionDataset([(path, ["gray"])], name="test", resolution=8)[0]
        assert item["pixel_values"].abs().max() < 0.01  # mid-gray, not white (1.0)

    too_bright = tmp_path / "bright.tiff"
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(too_bright)
    with pytest.raises(Exception, match="no known white level"):
        load_image(too_bright)


def foreign_statistics(folder, marker) -> dict:
    """{file: a phrase its error must carry} for statistics files that are damaged, foreign or would run code."""
    folder.mkdir()
    d = 2048
    good = dict(mu=np.zeros(d), sigma=np.eye(d))
    np.savez(folder / "good.npz", **good)
    (folder / "truncated.npz").write_bytes((folder / "good.npz").read_bytes()[:5000])
    (folder / "text.npz").write_text("mu,sigma\n")
    np.savez(folder / "no-sigma.npz", mu=good["mu"])
    np.savez(folder / "64-d.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(folder / "pickled.npz", mu=np.array([RunsCode(marker)], dtype=object), sigma=good["sigma"])
    np.savez(folder / "strings.npz", mu=np.array(["a"] * d), sigma=good["sigma"])
    return {"truncated.npz": "not a .npz archive", "text.npz": "not a .npz archive",
            "no-sigma.npz": "has no sigma array", "64-d.npz": "shape (64,)", "pickled.npz": "cannot read statistics file",
            "strings.npz": "cannot read statistics file"}


def test_damaged_or_foreign_statistics_are_one_line_and_never_unpickled(folders, weights, tmp_path):
    marker = tmp_path / "marker"
    for name, phrase in foreign_statistics(tmp_path / "stats", marker).items():
        for args in ([str(folders / "generated"), str(tmp_path / "stats" / name)],
                     [str(tmp_path / "stats" / name), str(folders / "reference"), "--resolution", "32"]):
            message = one_error_line(runner.invoke(app, ["fid", *args, "--inception-weights", str(weights)]))
            assert phrase in message and name in message, (name, message)
    assert not marker.exists()
