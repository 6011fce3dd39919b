"""EXIF orientation (issue 15): a portrait phone photo, stored sideways with an Orientation tag, is read upright by the
training data (and lands in a portrait bucket), by classify and by fid."""

import io

import numpy as np
import pytest
from PIL import Image

from restune_sd.classify import ClassifyConfig, classify, predictions
from restune_sd.datasets import CaptionDataset, make_synthetic_classification
from restune_sd.datasets.buckets import bucket_sizes
from restune_sd.datasets.classification import ClassificationDataset
from restune_sd.datasets.image_files import image_size
from restune_sd.evaluation.fid import image_sizes, load_image
from restune_sd.tiny import write_tiny_vit

RED, BLUE = (220, 30, 30), (30, 30, 220)
# How a camera stores an upright picture for each Orientation value: the inverse of what the tag asks a reader to do.
STORED_SIDEWAYS = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def upright_photo(width: int = 32, height: int = 48) -> Image.Image:
    """A portrait picture, red on top and blue below, so that a sideways read is plain to see."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[: height // 2], pixels[height // 2:] = RED, BLUE
    return Image.fromarray(pixels)


def phone_photo(path, orientation: int, image: Image.Image | None = None):
    """`image` (default: upright_photo) stored sideways with the EXIF Orientation tag that turns it upright again."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    (image or upright_photo()).transpose(STORED_SIDEWAYS[orientation]).save(path, exif=exif, quality=95)
    return path


def is_upright(pixels: np.ndarray) -> bool:
    """[H, W, 3] uint8 pixels red at the top and blue at the bottom."""
    top, bottom = pixels[1, pixels.shape[1] // 2].astype(int), pixels[-2, pixels.shape[1] // 2].astype(int)
    return top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def to_uint8(tensor, mean=0.5, std=0.5) -> np.ndarray:
    """A normalised [3, H, W] tensor back to [H, W, 3] uint8."""
    return (tensor * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_portrait_phone_photo_trains_upright_in_a_portrait_bucket(orientation, tmp_path):
    photo = phone_photo(tmp_path / "phone.jpg", orientation)
    assert Image.open(photo).size == (48, 32)  # stored landscape
    assert image_size(photo) == (32, 48)
    dataset = CaptionDataset([(photo, ["a portrait"])], name="phone", resolution=32, bucket_sizes=bucket_sizes(32, step=8))
    width, height = dataset.crop_size(0)
    assert height > width, (width, height)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, height, width)
    assert is_upright(to_uint8(item["pixel_values"]))


def test_a_hugging_face_row_holding_a_phone_photo_is_read_upright(tmp_path):
    class Row:  # what datasets/hf.py's DatasetRow is to the readers: a source with its own open()
        def __init__(self, data: bytes):
            self.data = data

        def open(self):
            return Image.open(io.BytesIO(self.data))

    row = Row(phone_photo(tmp_path / "phone.jpg", 6).read_bytes())
    assert image_size(row) == (32, 48)
    assert is_upright(to_uint8(CaptionDataset([(row, ["a"])], name="hf", resolution=32)[0]["pixel_values"]))


def test_classification_data_and_fid_read_the_photo_upright(tmp_path):
    photo = phone_photo(tmp_path / "phone.jpg", 6)
    dataset = ClassificationDataset([(photo, 0)], ["portrait"], name="phone", resolution=32)
    assert is_upright(to_uint8(dataset[0]["pixel_values"]))
    assert image_sizes([photo]) == {(32, 48)}
    pixels = load_image(photo)
    assert pixels.shape == (3, 48, 32) and is_upright(pixels.permute(1, 2, 0).numpy())


def test_classify_predict_sees_the_photo_as_it_sees_the_upright_picture(tmp_path):
    vit = str(write_tiny_vit(tmp_path / "vit"))
    root = make_synthetic_classification("classfolder", tmp_path / "data", num_classes=3, images_per_class=2, size=32)
    classify(ClassifyConfig(model=vit, data=f"classfolder:{root}", output=str(tmp_path / "run"), tuner="bypass",
                            max_steps=1, batch_size=4, warmup_epochs=0))
    picture = Image.open(sorted((root / "test").rglob("*.png"))[0]).convert("RGB").crop((0, 0, 32, 24))
    picture.save(tmp_path / "upright.png")
    phone_photo(tmp_path / "sideways.png", 6, picture)  # PNG keeps the pixels exact, and PNG carries EXIF too
    upright, sideways = (next(predictions(vit, [str(tmp_path / "run")], [tmp_path / name], 3, 1, notice=print))
                         for name in ("upright.png", "sideways.png"))
    assert upright["top_k"] == sideways["top_k"]
