"""Captions as an SD1.5 trainer's user writes them and the noise schedule they choose (issue 17, items 6 and 7): kohya's
tag shuffling and dropout drawn from (seed, epoch, index), `.caption` files, one warning line each for missing and
long captions, clip skip as diffusers computes it, and zero terminal SNR from training through `sample`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import restune_sd
import restune_sd.train as training
from restune_sd.cli.main import app
from restune_sd.datasets import build_dataset
from restune_sd.datasets.tags import TagOptions
from restune_sd.errors import UserError
from restune_sd.train import Encoders, TrainConfig, load_components, train

runner = CliRunner()
RES = 32
TAGS = ["sks dog", "red", "sitting", "grass", "small", "photo"]
LONG = [", ".join(["red dog"] * 40), ", ".join(["blue cat"] * 40)]  # 80 tags of one word each: past 77 tokens
PROMPT = "a red bus"
SEED = 5


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """A `folder:` data set of 4 images captioned with comma-separated tags, two of them too long for CLIP."""
    root = tmp_path_factory.mktemp("tagged")
    captions = [", ".join(TAGS), ", ".join(reversed(TAGS)), *LONG]
    lines = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (40, 40), ("red", "green", "blue", "white")[i]).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return f"folder:{root}"


def config(tiny, data, output, **overrides):
    return TrainConfig(model=tiny, data=data, tuner=overrides.pop("tuner", "res-tuning"), output=str(output),
                       **{"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "report_to": "none", **overrides})


def captions_by_epoch(data, epochs, **tags) -> list[list[str]]:
    dataset = build_dataset(data, resolution=RES, seed=3, tags=TagOptions(**tags))
    drawn = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        drawn.append([dataset[i]["caption"] for i in range(2)])  # the two short captions
    return drawn


def test_tags_after_the_kept_ones_are_shuffled_and_dropped_per_seed_epoch_and_index(tagged):
    shuffled = captions_by_epoch(tagged, 12, shuffle=True, keep=1)
    assert shuffled == captions_by_epoch(tagged, 12, shuffle=True, keep=1)  # a pure function of (seed, epoch, index)
    for epoch in shuffled:
        first, second = (caption.split(", ") for caption in epoch)
        assert first[0] == "sks dog" and sorted(first) == sorted(TAGS)  # kept in place; the rest only reordered
        assert second[0] == "photo" and sorted(second) == sorted(TAGS)
    assert len({tuple(epoch) for epoch in shuffled}) > 6  # the order changes from epoch to epoch
    dropped = captions_by_epoch(tagged, 40, keep=2, dropout=0.5)
    kept = [caption.split(", ") for epoch in dropped for caption in epoch]
    assert all(tags[:2] in (TAGS[:2], TAGS[::-1][:2]) for tags in kept)  # never dropped, and without --shuffle-tags
    assert all(tags == [t for t in (TAGS if tags[0] == "sks dog" else TAGS[::-1]) if t in tags] for tags in kept)
    share = sum(len(tags) - 2 for tags in kept) / (len(kept) * 4)
    assert 0.4 < share < 0.6, share
    assert captions_by_epoch(tagged, 1, keep=1, dropout=1.0) == [["sks dog", "photo"]]
    plain = build_dataset(tagged, resolution=RES, seed=3)
    assert [plain[i]["caption"] for i in range(2)] == [", ".join(TAGS), ", ".join(reversed(TAGS))]


def spy_captions(monkeypatch) -> list[list[str]]:
    """Every micro-batch's captions, as the text encoder receives them."""
    seen, original = [], Encoders.text

    def text(self, captions, device):
        seen.append(list(captions))
        return original(self, captions, device)

    monkeypatch.setattr(Encoders, "text", text)
    return seen


def test_a_run_with_shuffled_tags_resumes_exactly_and_caches_latents_but_not_texts(tiny, tagged, tmp_path, monkeypatch,
                                                                                  capsys):
    settings = dict(max_steps=4, checkpoint_every=2, keep_checkpoints=5, shuffle_tags=True, keep_tokens=1,
                    tag_dropout=0.3, cache=True, cache_dir="none")
    seen = spy_captions(monkeypatch)
    train(config(tiny, tagged, tmp_path / "straight", **settings))
    straight, seen[:] = list(seen), []
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len([w for w in warnings if "longer than" in w]) == 1
    assert len([w for w in warnings if "--cache keeps latents but not text embeddings" in w]) == 1
    written = {", ".join(TAGS), ", ".join(reversed(TAGS)), *LONG}
    assert any(caption not in written for batch in straight for caption in batch)  # the text encoder sees them shuffled
    assert not (tmp_path / "straight" / "cache" / "texts").exists()
    assert len(list((tmp_path / "straight" / "cache" / "latents").glob("*.safetensors"))) == 4

    interrupted = tmp_path / "interrupted"
    train(config(tiny, tagged, interrupted, **settings))
    (interrupted / "checkpoints" / "step-00000004.pt").unlink()
    for name in ("tuner", "results.json"):
        shutil.rmtree(interrupted / name) if (interrupted / name).is_dir() else (interrupted / name).unlink()
    seen[:] = []
    with pytest.raises(UserError, match="tag_dropout=0.3, not 0.5"):
        train(config(tiny, tagged, interrupted, resume="latest", **{**settings, "tag_dropout": 0.5}))
    train(config(tiny, tagged, interrupted, resume="latest", **settings))
    # Steps 3 and 4 (then the weights check before the final save) saw the captions the uninterrupted run saw; there
    # the check after the step-2 checkpoint came before them.
    assert len(straight) == 6 and seen == straight[3:]
    a = load_file(str(tmp_path / "straight" / "tuner" / "tuner.safetensors"))
    b = load_file(str(interrupted / "tuner" / "tuner.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kohya_image(path: Path, **captions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(path)
    for extension, text in captions.items():
        path.with_suffix(f".{extension}").write_text(text)


def test_kohya_finds_caption_and_txt_files_and_counts_the_missing_ones_in_one_line(tmp_path, capsys):
    kohya_image(tmp_path / "2_sks dog" / "a.png", caption="from a .caption file")
    kohya_image(tmp_path / "2_sks dog" / "b.png", txt="from a .txt file")
    kohya_image(tmp_path / "2_sks dog" / "c.png", caption="kohya's default comes first", txt="not this one")
    kohya_image(tmp_path / "2_sks dog" / "d.png")
    kohya_image(tmp_path / "1_cat" / "e.png")
    dataset = build_dataset(f"kohya:{tmp_path}", resolution=RES)
    captions = {dataset.paths[i].name: dataset.captions_of(i)[0] for i in range(len(dataset))}
    assert captions == {"a.png": "from a .caption file", "b.png": "from a .txt file",
                        "c.png": "kohya's default comes first", "d.png": "sks dog", "e.png": "cat"}
    [warning] = capsys.readouterr().err.strip().splitlines()
    assert "2 images of 5 without a .caption or .txt caption file" in warning and "as kohya does" in warning
    only_txt = build_dataset(f"kohya:{tmp_path}", resolution=RES, caption_extension=".txt")
    assert {only_txt.paths[i].name: only_txt.captions_of(i)[0] for i in range(len(only_txt))}["c.png"] == "not this one"
    assert "3 images of 5 without a .txt caption file" in capsys.readouterr().err


def test_clip_skip_embeds_captions_as_diffusers_encode_prompt_does(tiny):
    comps = load_components(tiny, torch.device("cpu"), torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    # diffusers 0.42 reads CLIPTextModel.text_model, which transformers >= 5.6 no longer has (diffusers issue 14124).
    object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    prompts = ["a red dog sitting on grass", ""]
    for clip_skip in (0, 1):
        ours = Encoders(comps, torch.float32, clip_skip=clip_skip).text(prompts, "cpu")
        stock = pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=clip_skip or None)[0]
        assert torch.equal(ours, stock), clip_skip
    assert not torch.allclose(Encoders(comps, torch.float32, clip_skip=1).text(prompts, "cpu"),
                              Encoders(comps, torch.float32).text(prompts, "cpu"))


def embed(pipe, texts: list[str], clip_skip: int) -> torch.Tensor:
    """Prompt embeddings from the penultimate layers through the final layer norm, written out with transformers."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return pipe.text_encoder.final_layer_norm(hidden)


def stock_image(tiny, run, zero_snr: bool) -> np.ndarray:
    """The stock pipeline with the tuner, v-prediction, clip skip 1 and (or not) diffusers' zero-terminal-SNR advice."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    restune_sd.load_tuner(pipe, str(run))
    advice = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if zero_snr else {}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction", **advice)
    with torch.no_grad():
        image = pipe(prompt_embeds=embed(pipe, [PROMPT], 1), negative_prompt_embeds=embed(pipe, [""], 1),
                     guidance_rescale=0.7 if zero_snr else 0.0, num_inference_steps=3,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image).astype(int)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_zero_terminal_snr_and_clip_skip_train_are_recorded_and_sample_as_a_stock_pipeline(tiny, tagged, tmp_path,
                                                                                           monkeypatch, capsys):
    loaded, original = [], training.load_components
    monkeypatch.setattr(training, "load_components", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    run = tmp_path / "run"
    train(config(tiny, tagged, run, tuner="bypass", prediction_type="v_prediction", zero_terminal_snr=True, clip_skip=1,
                 gradient_checkpointing=True, validation_prompts=[PROMPT], validation_steps=3, seed=SEED))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--gradient-checkpointing" in line]
    assert len(warnings) == 1 and "no effect with the bypass tuner" in warnings[0]
    assert loaded[0].noise_scheduler.alphas_cumprod[-1].item() == 0.0
    assert loaded[0].noise_scheduler.config.rescale_betas_zero_snr
    tuner = json.loads((run / "tuner" / "tuner_config.json").read_text())
    assert (tuner["zero_terminal_snr"], tuner["clip_skip"], tuner["prediction_type"]) == (True, 1, "v_prediction")
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["zero_terminal_snr"], recorded["clip_skip"]) == (True, 1)

    result = runner.invoke(app, ["sample", "--model", tiny, "--tuner", str(run), "--prompt", PROMPT, "--seed",
                                 str(SEED), "--steps", "3", "--out", str(tmp_path / "samples"), "--no-fp16"])
    assert result.exit_code == 0, result.output
    sampled, stock = pixels(tmp_path / "samples" / "00000.png"), stock_image(tiny, run, zero_snr=True)
    assert np.array_equal(sampled, stock)
    assert np.abs(stock - stock_image(tiny, run, zero_snr=False)).max() > 10  # the schedule does matter
    [validation] = sorted((run / "validation").glob("step-*/prompt-000-image-*.png"))
    assert np.abs(pixels(validation) - stock).max() <= 1

    line = one_error_line(["sample", "--model", tiny, "--tuner", str(run), "--prompt", PROMPT, "--scheduler", "pndm",
                           "--out", str(tmp_path / "pndm")])
    assert "zero terminal SNR" in line and "pndm" in line and not (tmp_path / "pndm").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--keep-tokens", "-1", "--shuffle-tags"], "--keep-tokens must be >= 0"),
    (["--keep-tokens", "2"], "neither is given"),
    (["--tag-dropout", "1.5"], "--tag-dropout must be >= 0 and <= 1"),
    (["--tag-dropout", "-0.1"], "--tag-dropout must be >= 0 and <= 1"),
    (["--clip-skip", "-1"], "--clip-skip must be >= 0"),
    (["--clip-skip", "2"], "it has 2, so the clip skip must be 0 to 1"),
    (["--zero-terminal-snr"], "needs --prediction-type v_prediction"),
    (["--zero-terminal-snr", "--prediction-type", "epsilon"], "needs --prediction-type v_prediction"),
    (["--zero-terminal-snr", "--prediction-type", "v_prediction", "--validation-scheduler", "heun",
      "--validation-prompt", PROMPT], "scheduler heun (HeunDiscreteScheduler) cannot sample"),
    (["--caption-extension", "caption"], "must start with a dot"),
])
def test_bad_caption_and_schedule_settings_are_one_line(tiny, tagged, tmp_path, flags, expected):
    line = one_error_line(["train", "--model", tiny, "--data", tagged, "--output", str(tmp_path / "run"), *flags])
    assert expected in line, line
    assert not (tmp_path / "run").exists()


def test_a_guidance_rescale_outside_0_to_1_is_one_line(tiny, tmp_path):
    line = one_error_line(["sample", "--model", tiny, "--prompt", PROMPT, "--guidance-rescale", "1.5",
                           "--out", str(tmp_path / "out")])
    assert "--guidance-rescale must be >= 0 and <= 1" in line
