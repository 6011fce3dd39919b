"""kohya: folders read as sd-scripts' `--train_data_dir` reads them: only `N_name` sub-folders with N >= 1, what kohya
skips skipped with a warning line, uncaptioned images captioned with the folder's name, and repeat counts bounded."""

import pytest
from PIL import Image

import restune_sd.datasets.kohya as kohya
from restune_sd.datasets import build_dataset
from restune_sd.errors import UserError

RES = 32


def image(path, colour="red", caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def captions(dataset) -> list[tuple[str, list[str]]]:
    return [(f"{dataset.paths[i].parent.name}/{dataset.paths[i].name}", dataset.captions_of(i)) for i in range(len(dataset))]


def one_line_error(root) -> str:
    with pytest.raises(UserError) as raised:
        build_dataset(f"kohya:{root}", resolution=RES)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_only_numbered_sub_folders_are_read_and_what_kohya_skips_is_said(tmp_path, capsys):
    image(tmp_path / "loose.png", caption="an image directly in ROOT")
    image(tmp_path / "dog" / "a.png", caption="a folder without a repeat count")
    image(tmp_path / "0_cat" / "b.png", caption="zero repeats")
    image(tmp_path / "dog_10" / "c.png", caption="the count must come first")
    image(tmp_path / ".cache" / "d.png", caption="hidden")
    image(tmp_path / "2_sks dog" / "e.png", caption="a photo of sks dog")
    image(tmp_path / "2_sks dog" / "f.png")
    dataset = build_dataset(f"kohya:{tmp_path}", resolution=RES)
    assert captions(dataset) == [("2_sks dog/e.png", ["a photo of sks dog"])] * 2 + [("2_sks dog/f.png", ["sks dog"])] * 2
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3, warnings
    folders, loose, uncaptioned = warnings
    assert "skipped 3 sub-folders" in folders and "0_cat" in folders and "N_name" in folders and ".cache" not in folders
    assert "skipped 1 image" in loose and "loose.png" in loose
    assert "1 image of 2 without a .caption or .txt caption file" in uncaptioned and "f.png" in uncaptioned


def test_the_name_is_everything_after_the_first_underscore_and_may_be_empty(tmp_path, capsys):
    image(tmp_path / "3_sks_dog_v2" / "a.png")
    image(tmp_path / "1" / "b.png")
    image(tmp_path / "1" / "c.png", caption="a captioned one")
    dataset = build_dataset(f"kohya:{tmp_path}", resolution=RES)
    assert captions(dataset) == [("1/b.png", [""]), ("1/c.png", ["a captioned one"])] + [("3_sks_dog_v2/a.png", ["sks_dog_v2"])] * 3
    assert "2 images of 3 without a .caption or .txt caption file" in capsys.readouterr().err


def test_nothing_to_read_names_the_layout_kohya_expects(tmp_path):
    image(tmp_path / "a.png", caption="in ROOT")
    image(tmp_path / "dogs" / "b.png", caption="no count")
    message = one_line_error(tmp_path)
    assert "no images" in message and "N_name" in message and "10_dog" in message


@pytest.mark.parametrize("name", ["99999999_dog", "10001_dog", "1" * 200 + "_dog"])
def test_a_repeat_count_past_the_bound_is_one_line_naming_the_folder(tmp_path, name):
    image(tmp_path / name / "a.png", caption="a dog")
    message = one_line_error(tmp_path)
    assert name in message and "10,000" in message


def test_the_bound_itself_is_accepted(tmp_path):
    image(tmp_path / "10000_dog" / "a.png", caption="a dog")
    assert len(build_dataset(f"kohya:{tmp_path}", resolution=RES)) == 10_000


def test_an_epoch_past_the_sample_bound_is_one_line_naming_the_largest_folder(tmp_path):
    """Images are only listed before the bound is checked, so empty files stand in for them."""
    image(tmp_path / "1_cat" / "a.png", caption="a cat")
    folder = tmp_path / "9000_dog"
    folder.mkdir()
    for i in range(kohya.MAX_EPOCH_SAMPLES // 9000 + 1):
        (folder / f"{i:05d}.png").touch()
    message = one_line_error(tmp_path)
    assert "9000_dog" in message and "samples" in message and "10,000,000" in message
