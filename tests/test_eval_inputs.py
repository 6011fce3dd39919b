"""What `classify eval` and `fid` receive (issue 15): tuners scored only on their own classes, VTAB sweeps that keep
results made with other settings, GENERATED folders confined to themselves, statistics tied to their image size, and
decompression bombs, torn or non-UTF-8 listings, bad devices and batch sizes as one line each."""

import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line
from restune_sd.classify import ClassifyConfig, class_mismatch, classify
from restune_sd.datasets import CaptionDataset, make_synthetic_classification
from restune_sd.datasets.classification import build_classification_dataset
from restune_sd.errors import UserError
from restune_sd.evaluation.fid import compute_fid, load_statistics, save_statistics
from restune_sd.tiny import write_tiny_vit
from test_fid import smooth_images, weights  # noqa: F401 (weights: the session's seeded random Inception)


def bomb_png(path, side: int = 30000):
    """A PNG whose header claims side x side pixels (what PIL refuses as a decompression bomb), a few bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


# classify eval and --vtab-all


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return str(write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A three-class classfolder set and a tuner trained on it for one step."""
    root = make_synthetic_classification("classfolder", tmp_path_factory.mktemp("data") / "shapes", num_classes=3,
                                         images_per_class=2, size=32)
    return f"classfolder:{root}"


@pytest.fixture(scope="module")
def trained(vit, shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "shapes"
    classify(ClassifyConfig(model=vit, data=shapes, output=str(run), tuner="bypass", max_steps=1, batch_size=4,
                            warmup_epochs=0))
    return str(run)


def test_eval_refuses_a_data_set_with_as_many_classes_under_other_names(vit, shapes, trained, tmp_path):
    renamed = shutil.copytree(shapes.partition(":")[2], tmp_path / "renamed")
    for split in ("train", "test"):
        for k, folder in enumerate(sorted((renamed / split).iterdir())):
            folder.rename(folder.with_name(f"{k}_other_{k}"))
    message = one_error_line(["classify", "eval", "--model", vit, "--tuner", trained, "--data", f"classfolder:{renamed}"])
    assert "red circle" in message and "other 0" in message, message


def test_class_mismatch_names_both_lists_and_a_change_of_order():
    assert class_mismatch(["a", "b", "c"], ["a", "b", "c"]) is None
    assert "(a, b, c)" in class_mismatch(["a", "b", "c"], ["x", "y", "z"])
    assert "(x, y, z)" in class_mismatch(["a", "b", "c"], ["x", "y", "z"])
    assert "another order" in class_mismatch(["a", "b", "c"], ["b", "a", "c"])
    many = class_mismatch([f"c{k}" for k in range(100)], [f"d{k}" for k in range(100)])
    assert "\n" not in many and len(many) < 400, many


def test_eval_batch_size_is_bounded(vit, shapes, trained):
    for size in ("0", "-3", "100000000"):
        message = one_error_line(["classify", "eval", "--model", vit, "--tuner", trained, "--data", shapes,
                                  "--batch-size", size])
        assert "--batch-size" in message, message


@pytest.fixture
def sweep(vit, tmp_path):
    """A VTAB-1K root of one small task, and the arguments of a res-tuning sweep of it into tmp_path/out."""
    make_synthetic_classification("vtab", tmp_path / "vtab", num_classes=4, images_per_class=2, size=32, task="kitti")
    out = tmp_path / "out"
    args = ["classify", "eval", "--model", vit, "--vtab-all", str(tmp_path / "vtab"), "--output", str(out),
            "--max-steps", "1", "--batch-size", "4", "--warmup-epochs", "0"]
    return out, args


def invoke(args):
    from typer.testing import CliRunner

    from restune_sd.cli.main import app

    return CliRunner().invoke(app, args)


def files_of(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sweep_refuses_results_made_with_other_settings_and_reuses_its_own(sweep):
    out, args = sweep
    first = invoke([*args, "--preset", "res-tuning"])
    assert first.exit_code == 0, first.output
    table = json.loads((out / "vtab.json").read_text())
    assert table["settings"]["tuner"] == "res-tuning" and table["settings"]["max_steps"] == 1
    before = files_of(out)
    for other in (["--preset", "bypass"], ["--preset", "res-tuning", "--max-steps", "2"],
                  ["--preset", "res-tuning", "--seed", "1"]):
        message = one_error_line([*args, *other])
        assert "kitti" in message and "settings" in message, message
    assert files_of(out) == before  # neither the task's results nor the table were touched
    again = invoke([*args, "--preset", "res-tuning"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["tasks"] == table["tasks"]  # the task's result was reused, not retrained
    assert (out / "kitti" / "results.json").read_bytes() == before["kitti/results.json"]


def test_a_table_of_other_settings_is_not_overwritten(sweep):
    out, args = sweep
    out.mkdir()
    (out / "vtab.json").write_text(json.dumps({"tuner": "res-tuning", "tasks": {"cifar": 70.0}}))
    assert "vtab.json" in one_error_line([*args, "--preset", "bypass"])
    (out / "vtab.json").write_text(json.dumps({"tuner": "bypass", "tasks": {}, "settings": {"tuner": "lora"}}))
    assert "vtab.json" in one_error_line([*args, "--preset", "bypass"])


def test_a_users_own_vtab_md_is_never_replaced(sweep):
    out, args = sweep
    out.mkdir()
    notes = out / "vtab.md"
    notes.write_text("my notes on last week's sweep\n")
    message = one_error_line([*args, "--preset", "bypass"])
    assert "vtab.md" in message and "not replaced" in message, message
    assert notes.read_text() == "my notes on last week's sweep\n" and not (out / "kitti").exists()
    notes.unlink()
    assert invoke([*args, "--preset", "bypass"]).exit_code == 0
    assert invoke([*args, "--preset", "bypass"]).exit_code == 0  # its own table is replaced by the same sweep
    notes.write_text(notes.read_text() + "\nbypass looks good here\n")  # the user annotates the sweep's table
    edited = notes.read_bytes()
    message = one_error_line([*args, "--preset", "bypass"])
    assert "vtab.md" in message and "edited" in message, message
    assert notes.read_bytes() == edited


def test_a_truncated_task_result_is_one_line_naming_it(sweep):
    out, args = sweep
    assert invoke([*args, "--preset", "bypass"]).exit_code == 0
    results = out / "kitti" / "results.json"
    results.write_text(results.read_text()[:40])
    message = one_error_line([*args, "--preset", "bypass"])
    assert str(results) in message and "remove" in message, message


# fid: GENERATED confined to itself, statistics tied to their size


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    return {"generated": smooth_images(root / "generated", 4, seed=1), "reference": smooth_images(root / "reference", 4, seed=2),
            "small": smooth_images(root / "small", 4, seed=3, size=(16, 16)), "root": root}


def listed_folder(folder, names, text=None):
    """`folder` as `restune-sd sample` leaves it: its images and a samples.jsonl naming `names` (or holding `text`)."""
    folder.mkdir()
    smooth_images(folder, 2, seed=4)
    (folder / "samples.jsonl").write_text(text if text is not None else
                                          "".join(json.dumps({"file": name, "prompt": "p"}) + "\n" for name in names))
    return folder


def test_samples_jsonl_names_stay_inside_generated(images, weights, tmp_path):  # noqa: F811
    outside = [f"../{images['generated'].name}/000.png", f"../{images['generated'].name}/001.png"]
    escaping = listed_folder(tmp_path / "escaping", outside)
    shutil.copytree(images["generated"], tmp_path / images["generated"].name)
    absolute = listed_folder(tmp_path / "absolute", [str(images["generated"] / "000.png"), "000.png"])
    linked = listed_folder(tmp_path / "linked", ["000.png", "outside.png"])
    (linked / "outside.png").symlink_to(images["generated"] / "001.png")
    for folder, phrase in ((escaping, ".."), (absolute, "absolute"), (linked, "outside")):
        with pytest.raises(UserError) as caught:
            compute_fid(folder, images["reference"], inception_weights=weights, device="cpu")
        assert "samples.jsonl" in str(caught.value) and phrase in str(caught.value), str(caught.value)


def test_a_torn_or_foreign_samples_jsonl_is_one_line(images, weights, tmp_path):  # noqa: F811
    good = json.dumps({"file": "000.png", "prompt": "p"}) + "\n"
    cases = {
        "torn": (good + '{"file": "001.pn', "line 2"),
        "not-a-dict": (good + "[1, 2]\n", "line 2"),
        "no-file": (good + json.dumps({"prompt": "p"}) + "\n", "line 2"),
    }
    for name, (text, phrase) in cases.items():
        folder = listed_folder(tmp_path / name, [], text)
        message = one_error_line(["fid", str(folder), str(images["reference"]), "--inception-weights", str(weights)])
        assert "samples.jsonl" in message and phrase in message, (name, message)
    latin = listed_folder(tmp_path / "latin-1", [], "")
    (latin / "samples.jsonl").write_bytes((good + json.dumps({"file": "001.png", "prompt": "café"},
                                                             ensure_ascii=False) + "\n").encode("latin-1"))
    message = one_error_line(["fid", str(latin), str(images["reference"]), "--inception-weights", str(weights)])
    assert "UTF-8" in message and "samples.jsonl" in message, message


def test_statistics_made_at_another_image_size_are_refused(images, weights, tmp_path):  # noqa: F811
    stats = tmp_path / "reference-32.npz"
    compute_fid(images["generated"], images["reference"], inception_weights=weights, save_stats=stats)
    assert load_statistics(stats).resolution == 32
    message = one_error_line(["fid", str(images["small"]), str(stats), "--inception-weights", str(weights)])
    assert "32" in message and "16" in message, message
    # An older file of ours records no size: it says so and how to make one that does.
    older = load_statistics(stats)
    older.resolution = None
    save_statistics(tmp_path / "older.npz", older)
    message = one_error_line(["fid", str(images["generated"]), str(tmp_path / "older.npz"),
                              "--inception-weights", str(weights)])
    assert "no image size" in message and "--save-stats" in message, message


def test_statistics_made_with_other_inception_weights_are_refused(images, weights, tmp_path):  # noqa: F811
    from restune_sd.evaluation.fid import write_random_inception_weights

    stats = tmp_path / "reference.npz"
    first = compute_fid(images["generated"], images["reference"], inception_weights=weights, save_stats=stats)
    assert len(load_statistics(stats).inception) == 64
    other = write_random_inception_weights(tmp_path / "other-inception.pth", seed=7)
    for args in ([str(images["generated"]), str(stats), "--inception-weights", str(other)],
                 [str(stats), str(images["reference"]), "--inception-weights", str(other), "--resolution", "32"]):
        message = one_error_line(["fid", *args])
        assert "reference.npz" in message and "other Inception weights" in message, message
    # Two statistics files made by different weights are not compared either; the same weights still are.
    other_stats = tmp_path / "generated-other.npz"
    compute_fid(images["generated"], images["reference"], inception_weights=other, save_stats=other_stats)
    with pytest.raises(UserError, match="other Inception weights"):
        compute_fid(other_stats, stats)
    again = compute_fid(images["generated"], stats, inception_weights=weights)
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-6)


def test_fid_refuses_a_sample_folder_still_being_written_or_left_unfinished(images, weights, tmp_path):  # noqa: F811
    from restune_sd.runfolder import FolderLock

    out = shutil.copytree(images["generated"], tmp_path / "samples")
    (out / "sample_config.json").write_text(json.dumps({"settings": {}, "tuner": None}))
    with FolderLock(out, "--out"):  # as a running `restune-sd sample --out OUT` holds it
        message = one_error_line(["fid", str(out), str(images["reference"]), "--inception-weights", str(weights)])
        assert "being written by restune-sd process" in message, message
    message = one_error_line(["fid", str(out), str(images["reference"]), "--inception-weights", str(weights)])
    assert "unfinished" in message and "run the same sample command again" in message, message
    names = sorted(p.name for p in out.glob("*.png"))
    (out / "samples.jsonl").write_text("".join(json.dumps({"file": name, "prompt": "p"}) + "\n" for name in names))
    assert compute_fid(out, images["reference"], inception_weights=weights)["num_generated"] == len(names)


def test_fid_device_and_batch_size_are_checked_before_any_work(images, weights):  # noqa: F811
    args = ["fid", str(images["generated"]), str(images["reference"]), "--inception-weights", str(weights)]
    for device in ("meta", "cuda:x", "tpu", "cuda:99"):
        assert "--device" in one_error_line([*args, "--device", device])
    for size in ("0", "100000000"):
        assert "--batch-size" in one_error_line([*args, "--batch-size", size])


def test_a_decompression_bomb_among_fid_images_is_one_line_naming_it(images, weights, tmp_path):  # noqa: F811
    for side in ("generated", "reference"):
        folder = shutil.copytree(images[side], tmp_path / side)
        bomb_png(folder / "zz-bomb.png")
        other = images["reference" if side == "generated" else "generated"]
        pair = [str(folder), str(other)] if side == "generated" else [str(other), str(folder)]
        message = one_error_line(["fid", *pair, "--inception-weights", str(weights)])
        assert "zz-bomb.png" in message, message


def test_a_decompression_bomb_among_training_images_is_skipped_as_corrupt(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(good)
    bomb = bomb_png(tmp_path / "bomb.png")
    with pytest.warns(UserWarning, match="bomb.png"):
        item = CaptionDataset([(bomb, ["a"]), (good, ["b"])], name="test", resolution=16)[0]
    assert item["index"] == 1 and item["skipped"] == 1
    root = make_synthetic_classification("classfolder", tmp_path / "classes", num_classes=2, images_per_class=2, size=16)
    first = sorted(p for p in (root / "train").rglob("*") if p.is_file())[0]
    bomb_png(first)
    dataset = build_classification_dataset(f"classfolder:{root}", split="train", resolution=16)
    with pytest.warns(UserWarning, match=first.name):
        assert dataset[dataset.paths.index(first)]["skipped"] == 1


def test_a_prompts_file_that_is_not_utf8_is_one_line(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a café at dawn\n".encode("latin-1"))
    message = one_error_line(["sample", "--model", tiny, "--out", str(tmp_path / "out"), "--prompts-file", str(prompts),
                              "--steps", "1"])
    assert "prompts.txt" in message and "UTF-8" in message, message
    assert not (tmp_path / "out").exists()


def test_a_sweep_goes_on_from_an_interrupted_tasks_checkpoint_and_holds_its_folder(sweep):
    from restune_sd.runfolder import FolderLock

    out, args = sweep
    args = [*args, "--preset", "res-tuning", "--max-steps", "2", "--checkpoint-every", "1"]
    first = invoke(args)
    assert first.exit_code == 0, first.output
    table = json.loads((out / "vtab.json").read_text())
    # As a kill during the task's second step leaves it: one checkpoint, no results, no table.
    task = out / "kitti"
    for name in ("results.json", "tuner", "checkpoints/step-00000002.pt", "checkpoints/step-00000002-tuner"):
        shutil.rmtree(task / name) if (task / name).is_dir() else (task / name).unlink()
    (out / "vtab.json").unlink()
    (out / "vtab.md").unlink()
    again = invoke(args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "vtab.json").read_text())["tasks"] == table["tasks"]  # resumed exactly, not retrained
    assert [json.loads(line)["step"] for line in (task / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with FolderLock(out, "--output"):
        assert "is in use by restune-sd process" in one_error_line(args)


def test_statistics_being_computed_by_another_command_are_refused_at_once(images, weights, tmp_path):  # noqa: F811
    from restune_sd.runfolder import FolderLock

    stats = tmp_path / "reference.npz"
    with FolderLock(tmp_path, "--save-stats", name=".reference.npz.lock"):
        message = one_error_line(["fid", str(images["generated"]), str(images["reference"]), "--inception-weights",
                                  str(weights), "--save-stats", str(stats)])
    assert "in use by restune-sd process" in message and not stats.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
