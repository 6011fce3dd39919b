"""Aspect-ratio bucketing: kohya's bucket sizes, images assigned by aspect ratio, a stream whose optimizer steps each
draw from one bucket, and training with it that resumes and splits over two processes exactly."""

from collections import defaultdict

import pytest
import torch
from conftest import launched_in_two_processes
from safetensors.torch import load_file

import restune_sd.train as training
from restune_sd.datasets import build_dataset, make_synthetic
from restune_sd.datasets.buckets import Buckets, bucket_sizes
from restune_sd.errors import UserError
from restune_sd.streams import BucketStream, SampleStream, StepBatches, sample_stream
from restune_sd.train import TrainConfig, train

RES = 64
STEP = 32  # the tiny model's 64-pixel images need buckets finer than kohya's 64
SIZES = bucket_sizes(RES, STEP)


@pytest.fixture(scope="module")
def kohya(tmp_path_factory):
    return f"kohya:{make_synthetic('kohya', tmp_path_factory.mktemp('data') / 'kohya', num_classes=2, images_per_class=4)}"


def test_bucket_sizes_follow_kohyas_make_bucket_resolutions():
    sizes = bucket_sizes(512)  # kohya's defaults: steps of 64 from 256 to 1024
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes and (320, 768) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0 and 256 <= min(width, height) and max(width, height) <= 1024
        assert width * height <= 512 * 512 and (height, width) in sizes
        assert width * height > 512 * 512 - 64 * max(width, height)  # the tallest height that fits the area
    assert sizes == sorted(set(sizes))
    assert SIZES == [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]


@pytest.mark.parametrize("options, words", [
    (dict(min_side=48), ["--bucket-min-side 48", "multiple of --bucket-step 32"]),
    (dict(max_side=160 + 16), ["--bucket-max-side"]),
    (dict(min_side=96), ["must lie between"]),
])
def test_bad_bucket_bounds_are_one_line(options, words):
    with pytest.raises(UserError) as raised:
        bucket_sizes(RES, STEP, **options)
    assert "\n" not in str(raised.value) and all(word in str(raised.value) for word in words), str(raised.value)


def test_images_go_to_the_bucket_of_nearest_aspect_ratio():
    buckets = Buckets.assign(SIZES, [(300, 100), (100, 290), (50, 50), None, (400, 100), (64, 60)])
    assert [SIZES[b] for b in buckets.of] == [(96, 32), (32, 96), (64, 64), (64, 64), (128, 32), (64, 64)]
    assert buckets.members() == [[1], [2, 3, 5], [0], [4]]


def test_items_are_cropped_to_their_bucket(kohya):
    dataset = build_dataset(kohya, resolution=RES, bucket_sizes=SIZES)
    assert len({dataset.buckets.of[i] for i in range(len(dataset))}) == 3
    for index in range(len(dataset)):
        width, height = dataset.buckets.sizes[dataset.buckets.of[index]]
        assert dataset[index]["pixel_values"].shape == (3, height, width)
    assert build_dataset(kohya, resolution=RES).buckets is None


def test_a_corrupt_image_is_replaced_at_the_size_of_its_bucket(tmp_path):
    root = make_synthetic("kohya", tmp_path, num_classes=2, images_per_class=4, corrupt=3)
    dataset = build_dataset(f"kohya:{root}", resolution=RES, bucket_sizes=SIZES)
    for index in range(len(dataset)):
        width, height = dataset.buckets.sizes[dataset.buckets.of[index]]
        assert dataset[index]["pixel_values"].shape == (3, height, width)
    assert dataset.num_corrupt > 0


def test_each_step_of_the_stream_is_one_bucket_and_each_epoch_sees_every_image(kohya):
    dataset = build_dataset(kohya, resolution=RES, bucket_sizes=SIZES)
    group = 4
    stream = sample_stream(dataset, seed=3, group=group)
    assert isinstance(stream, BucketStream) and stream.epoch_size % group == 0
    for epoch in range(3):
        located = [stream.locate(p) for p in range(epoch * stream.epoch_size, (epoch + 1) * stream.epoch_size)]
        assert {e for e, _ in located} == {epoch}
        indices = [i for _, i in located]
        assert set(indices) == set(range(len(dataset)))
        for start in range(0, len(indices), group):
            assert len({dataset.buckets.of[i] for i in indices[start:start + group]}) == 1
    fresh = sample_stream(dataset, seed=3, group=group)
    positions = range(3 * stream.epoch_size)
    assert [fresh.locate(p) for p in reversed(positions)][::-1] == [stream.locate(p) for p in positions]
    other = sample_stream(dataset, seed=4, group=group)
    assert [other.locate(p) for p in positions] != [stream.locate(p) for p in positions]
    assert type(sample_stream(build_dataset(kohya, resolution=RES), seed=3, group=group)) is SampleStream


def test_a_process_micro_batch_is_its_slice_of_the_steps_bucket(kohya):
    """With the per-step sampler, each process's micro-batches stack: one size per micro-batch, one per step."""
    dataset = build_dataset(kohya, resolution=RES, bucket_sizes=SIZES)
    stream = sample_stream(dataset, seed=0, group=2 * 2 * 2)  # batch 2, two processes, accumulation 2
    for rank in range(2):
        batches = StepBatches(0, 6, accumulation=2, global_batch=4, rank=rank, batch=2)
        loader = torch.utils.data.DataLoader(stream, batch_sampler=batches)
        shapes = [tuple(batch["pixel_values"].shape[-2:]) for batch in loader]
        assert len(shapes) == 12 and all(shapes[s] == shapes[s + 1] for s in range(0, 12, 2))
        assert len(set(shapes)) > 1


def config(tiny, data, output, **overrides):
    return TrainConfig(model=tiny, data=data, tuner="res-tuning", output=str(output), resolution=RES, buckets=True,
                       caption_dropout=0.5, report_to="none",
                       **{"bucket_step": STEP, "batch_size": 2, "learning_rate": 1e-3, **overrides})


def test_training_steps_draw_one_bucket_and_an_epoch_counts_the_padded_buckets(tiny, kohya, tmp_path, monkeypatch):
    seen = defaultdict(set)
    original = training.diffusion_loss

    def recording(unet, encoders, batch, cfg, step, device):
        seen[step].add(tuple(batch["pixel_values"].shape))
        return original(unet, encoders, batch, cfg, step, device)

    monkeypatch.setattr(training, "diffusion_loss", recording)
    results = train(config(tiny, kohya, tmp_path / "run", gradient_accumulation=2, cache=True))
    dataset = build_dataset(kohya, resolution=RES, bucket_sizes=SIZES)
    assert results["steps"] == sample_stream(dataset, 0, group=4).epoch_size // 4
    assert all(len(shapes) == 1 for shapes in seen.values()) and len(seen) == results["steps"]
    assert len({shape for shapes in seen.values() for shape in shapes}) == 3


def test_a_bucket_step_the_vae_cannot_encode_is_one_line(tiny, kohya, tmp_path):
    with pytest.raises(UserError, match="--bucket-step must be a multiple of 8"):
        train(config(tiny, kohya, tmp_path / "run", bucket_step=36, max_steps=1))
    assert not (tmp_path / "run").exists()


def test_bucketed_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny, kohya, tmp_path):
    settings = dict(checkpoint_every=3, random_flip=True, cache=True, cache_dir="none")
    train(config(tiny, kohya, tmp_path / "straight", max_steps=6, **settings))
    # Stopped after its step-3 checkpoint, with the latent cache as it was then, and continued to step 6.
    train(config(tiny, kohya, tmp_path / "resumed", max_steps=3, **settings))
    train(config(tiny, kohya, tmp_path / "resumed", max_steps=6, resume="latest", **settings))
    a = load_file(str(tmp_path / "straight" / "tuner" / "tuner.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "tuner" / "tuner.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cached = [path.stem for path in (tmp_path / "resumed" / "cache" / "latents").glob("*.safetensors")]
    assert {key.split("-")[1] for key in cached} == {"0", "1"} and len({key.split("-")[2] for key in cached}) > 1


def test_bucketed_two_processes_match_one_process_with_the_combined_batch(tiny, kohya, tmp_path):
    args = ["train", "--model", tiny, "--data", kohya, "--resolution", str(RES), "--buckets", "--bucket-step", str(STEP),
            "--caption-dropout", "0.5", "--max-steps", "3", "--learning-rate", "1e-3", "--report-to", "none"]
    a = launched_in_two_processes(args, tmp_path / "two", batch_size=2)
    train(config(tiny, kohya, tmp_path / "one", max_steps=3, batch_size=4))
    b = load_file(str(tmp_path / "one" / "tuner" / "tuner.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
