"""Data as other trainers ship it: kohya folders (same-name captions, N_name repeats), local Hugging Face datasets
(saved with save_to_disk, or imagefolders), and caption dropout."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import restune_sd.datasets
from restune_sd.cli.main import app
from restune_sd.datasets import build_dataset, make_synthetic
from restune_sd.datasets.hf import hf_datasets
from restune_sd.datasets.synthetic import class_words
from restune_sd.errors import UserError
from restune_sd.tiny import write_tiny_sd

RES = 32
hf = hf_datasets()


def one_line_error(spec: str, **options) -> str:
    with pytest.raises(UserError) as raised:
        build_dataset(spec, resolution=RES, **options)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def picture(colour: str, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


# --- kohya ---------------------------------------------------------------------------------------------------------

def test_kohya_captions_come_from_same_name_files_and_folders_repeat(tmp_path, capsys):
    root = make_synthetic("kohya", tmp_path, num_classes=2, images_per_class=4)
    dataset = build_dataset(f"kohya:{root}", resolution=RES)
    images = sorted(root.rglob("*.png"))
    assert len(dataset) == 4 * 1 + 4 * 2  # "1_red circle" once, "2_green square" twice
    by_path = {}
    for index, path in enumerate(dataset.paths):
        by_path.setdefault(path, []).append(dataset.captions_of(index))
    assert set(by_path) == set(images)
    for path, captions in by_path.items():
        caption_file = path.with_suffix(".txt")
        expected = caption_file.read_text().strip() if caption_file.exists() else path.parent.name.split("_", 1)[1]
        assert captions == [[expected]] * (2 if path.parent.name.startswith("2_") else 1)
    assert "2 images of 8 without a .caption or .txt caption file" in capsys.readouterr().err
    assert dataset[0]["pixel_values"].shape == (3, RES, RES)


def test_kohya_reads_the_first_line_of_another_caption_extension(tmp_path):
    (tmp_path / "1_red").mkdir()
    picture("red").save(tmp_path / "1_red" / "a.jpg")
    (tmp_path / "1_red" / "a.caption").write_text("a red picture\nnotes kohya ignores\n")
    (tmp_path / "1").mkdir()
    picture("blue").save(tmp_path / "1" / "b.png")
    (tmp_path / "1" / "b.caption").write_text("a blue picture")
    dataset = build_dataset(f"kohya:{tmp_path}", resolution=RES, caption_extension=".caption")
    assert [dataset.captions_of(i) for i in range(len(dataset))] == [["a blue picture"], ["a red picture"]]
    (tmp_path / "1_red" / "a.jpg").unlink()
    message = one_line_error(f"kohya:{tmp_path}", caption_extension=".txt")  # no caption, nor a folder name to fall back on
    assert "b.png" in message and "--caption-extension" in message


@pytest.mark.parametrize("case, words", [
    ("empty caption", ["a.txt", "empty"]), ("zero repeats only", ["no images", "N_name"]), ("no images", ["no images"]),
    ("missing folder", ["does not exist"]),
])
def test_kohya_bad_folders_are_one_line(tmp_path, case, words):
    root = tmp_path / "data"
    (root / "0_dog" if case == "zero repeats only" else root / "1_dog").mkdir(parents=True)
    (root / "1_dog" / "._resource_fork.png").parent.mkdir(exist_ok=True)
    (root / "1_dog" / "._resource_fork.png").write_bytes(b"macOS metadata, not an image")  # hidden files are passed over
    if case == "empty caption":
        picture("red").save(root / "1_dog" / "a.png")
        (root / "1_dog" / "a.txt").write_text("\n")
    elif case == "zero repeats only":
        picture("red").save(root / "0_dog" / "a.png")  # kohya skips a folder of 0 repeats
    elif case == "missing folder":
        root = tmp_path / "absent"
    message = one_line_error(f"kohya:{root}")
    assert all(word in message for word in words), message


# --- Hugging Face datasets -----------------------------------------------------------------------------------------

def saved_dataset(rows: dict, features: dict | None = None):
    features = hf.Features(features or {"image": hf.Image(), "text": hf.Value("string")})
    return hf.Dataset.from_dict(rows, features=features)


def test_hf_saved_dataset_and_splits(tmp_path):
    train = saved_dataset({"image": [picture("red"), picture("blue", (30, 40))], "text": ["a red one", "a blue one"]})
    val = saved_dataset({"image": [picture("green")], "text": ["a green one"]})
    train.save_to_disk(str(tmp_path / "single"))
    hf.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "dict"))
    hf.DatasetDict({"train": train, "val": val}).save_to_disk(str(tmp_path / "short"))

    single = build_dataset(f"hf:{tmp_path / 'single'}", resolution=RES)
    assert [single.captions_of(i) for i in range(2)] == [["a red one"], ["a blue one"]]
    item = single[1]
    assert item["pixel_values"].shape == (3, RES, RES) and item["caption"] == "a blue one"
    assert item["pixel_values"][2].mean() > 0.5 > item["pixel_values"][0].mean()  # blue, decoded from the stored bytes
    held_out = build_dataset(f"hf:{tmp_path / 'dict'}", split="val", resolution=RES)
    assert len(held_out) == 1 and held_out[0]["caption"] == "a green one"
    assert build_dataset(f"hf:{tmp_path / 'short'}", split="val", resolution=RES)[0]["caption"] == "a green one"
    assert "no split" in one_line_error(f"hf:{tmp_path / 'dict'}", split="test")
    assert "without splits" in one_line_error(f"hf:{tmp_path / 'single'}", split="val")


def test_hf_columns_are_chosen_and_a_wrong_one_lists_those_there_are(tmp_path):
    rows = {"picture": [picture("red"), picture("blue")], "prompts": [["a red one", "crimson"], ["a blue one"]]}
    saved_dataset(rows, {"picture": hf.Image(), "prompts": hf.Sequence(hf.Value("string"))}).save_to_disk(str(tmp_path))
    spec = f"hf:{tmp_path}"
    dataset = build_dataset(spec, resolution=RES, image_column="picture", caption_column="prompts")
    assert dataset.captions_of(0) == ["a red one", "crimson"] and dataset[0]["caption"] in ("a red one", "crimson")
    message = one_line_error(spec, caption_column="prompts")
    assert "'image'" in message and "picture, prompts" in message and "--image-column" in message
    assert "--caption-column" in one_line_error(spec, image_column="picture")
    assert "not images" in one_line_error(spec, image_column="prompts", caption_column="prompts")


def test_hf_image_file_names_in_a_string_column(tmp_path):
    picture("red").save(tmp_path / "a.png")
    rows = {"file": ["a.png"], "text": ["a red one"]}
    saved_dataset(rows, {"file": hf.Value("string"), "text": hf.Value("string")}).save_to_disk(str(tmp_path / "set"))
    (tmp_path / "set" / "a.png").write_bytes((tmp_path / "a.png").read_bytes())
    assert build_dataset(f"hf:{tmp_path / 'set'}", resolution=RES, image_column="file")[0]["caption"] == "a red one"
    (tmp_path / "set" / "a.png").unlink()
    assert "missing" in one_line_error(f"hf:{tmp_path / 'set'}", image_column="file")


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_hf_imagefolder_with_metadata(tmp_path, metadata):
    names = [f"img_{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        picture(("red", "green", "blue")[i]).save(tmp_path / name)
    captions = [f"picture {class_words(i)}" for i in range(3)]
    if metadata.endswith("jsonl"):
        text = "".join(json.dumps({"file_name": n, "caption": c}) + "\n" for n, c in zip(names, captions))
    else:
        text = "file_name,caption\n" + "".join(f"{n},{c}\n" for n, c in zip(names, captions))
    (tmp_path / metadata).write_text(text)
    dataset = build_dataset(f"hf:{tmp_path}", resolution=RES, caption_column="caption")
    assert sorted(dataset.captions_of(i)[0] for i in range(3)) == sorted(captions)
    assert "caption" in one_line_error(f"hf:{tmp_path}")  # the default column, text, is not there
    (tmp_path / "empty").mkdir()
    assert "cannot read" in one_line_error(f"hf:{tmp_path / 'empty'}")


def test_hf_is_found_even_where_this_repository_shadows_it(monkeypatch):
    """Run from the repository root, `import datasets` finds the datasets/ folder of this package's own sources."""
    repository = Path(restune_sd.datasets.__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(repository))
    monkeypatch.setitem(sys.modules, "datasets", restune_sd.datasets)
    assert hf_datasets().load_from_disk is not None


def test_training_on_an_hf_dataset_from_the_command_line(tmp_path):
    rows = {"img": [picture(c, (64, 48)) for c in ("red", "green", "blue", "white")], "text": ["a dog"] * 4}
    saved_dataset(rows, {"img": hf.Image(), "text": hf.Value("string")}).save_to_disk(str(tmp_path / "set"))
    model = write_tiny_sd(tmp_path / "tiny")
    result = CliRunner().invoke(app, ["train", "--model", str(model), "--data", f"hf:{tmp_path / 'set'}", "--output",
                                      str(tmp_path / "run"), "--image-column", "img", "--max-steps", "1",
                                      "--batch-size", "2", "--report-to", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 1
    result = CliRunner().invoke(app, ["train", "--model", str(model), "--data", f"hf:{tmp_path / 'set'}", "--output",
                                      str(tmp_path / "wrong"), "--max-steps", "1", "--report-to", "none"])
    assert result.exit_code == 2 and "img, text" in result.stderr and not (tmp_path / "wrong").exists()


# --- caption dropout -----------------------------------------------------------------------------------------------

def captions_over_epochs(root, epochs: int, **options) -> list[str]:
    dataset = build_dataset(f"folder:{root}", resolution=RES, **options)
    seen = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        seen += [dataset[i]["caption"] for i in range(len(dataset))]
    return seen


def test_caption_dropout_is_drawn_from_seed_epoch_and_index(tmp_path):
    root = make_synthetic("folder", tmp_path, num_classes=2, images_per_class=4)
    dropped = captions_over_epochs(root, 40, caption_dropout=0.3, seed=5)
    assert 0.2 < dropped.count("") / len(dropped) < 0.4
    assert dropped == captions_over_epochs(root, 40, caption_dropout=0.3, seed=5)  # a fresh dataset, the same draws
    assert dropped != captions_over_epochs(root, 40, caption_dropout=0.3, seed=6)
    kept = captions_over_epochs(root, 40, seed=5)
    assert "" not in kept and all(d in ("", k) for d, k in zip(dropped, kept))
    assert set(captions_over_epochs(root, 2, caption_dropout=1.0)) == {""}


def test_caption_dropout_out_of_range_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", str(tmp_path), "--data", f"folder:{tmp_path}", "--output",
                                      str(tmp_path / "run"), "--caption-dropout", "1.5"])
    assert result.exit_code == 2 and "--caption-dropout must be >= 0 and <= 1" in result.stderr


# --- listings confined to their data folder (issue 15) --------------------------------------------------------------

def outside_and_root(tmp_path) -> tuple[Path, Path]:
    picture("red").save(tmp_path / "outside.png")
    root = tmp_path / "root"
    root.mkdir()
    picture("green").save(root / "a.png")
    return tmp_path / "outside.png", root


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE", "sub/../../outside.png"])
def test_a_folder_listing_never_reads_outside_its_root(tmp_path, escape):
    outside, root = outside_and_root(tmp_path)
    name = str(outside) if escape == "ABSOLUTE" else escape
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a picture"}) + "\n"
                                                 for n in ("a.png", name)))
    message = one_line_error(f"folder:{root}")
    assert "outside the data folder" in message and "outside.png" in message, message
    # the same escape in a Hugging Face imagefolder: the library's own reason, in one line
    (root / "metadata.jsonl").rename(root / "kept.jsonl")
    (root / "metadata.jsonl").write_text((root / "kept.jsonl").read_text())
    (root / "kept.jsonl").unlink()
    message = one_line_error(f"hf:{root}")
    assert "file_name" in message or "outside" in message, message


def test_inner_paths_and_links_inside_the_root_still_read(tmp_path):
    outside, root = outside_and_root(tmp_path)
    (root / "sub").mkdir()
    picture("blue").save(root / "sub" / "b.png")
    (root / "linked.png").symlink_to(outside)  # a user's own link: their layout, followed
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a picture"}) + "\n"
                                                 for n in ("a.png", "sub/../sub/b.png", "linked.png")))
    assert len(build_dataset(f"folder:{root}", resolution=RES)) == 3


def test_a_vtab_listing_never_reads_outside_its_task(tmp_path):
    from restune_sd.datasets.classification import build_classification_dataset

    outside, root = outside_and_root(tmp_path)
    task = root / "kitti"
    (task / "images" / "train").mkdir(parents=True)
    picture("green").save(task / "images" / "train" / "000000.jpg")
    lines = "images/train/000000.jpg 0\n../../outside.png 1\n"
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
        (task / name).write_text(lines)
    with pytest.raises(UserError, match="outside the data folder"):
        build_classification_dataset(f"vtab:{task}", split="train", resolution=RES)
