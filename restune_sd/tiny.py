"""Tiny random Stable Diffusion pipelines and ViT classifiers written in the standard on-disk layouts.

Same seed, same bytes; nothing is downloaded (the CLIP tokenizer's vocabulary is generated here).
"""

import json
from collections import Counter
from pathlib import Path

import torch

from restune_sd.errors import UserError

TINY_SD_RESOLUTION = 64
TINY_VIT_RESOLUTION = 32

# SD v1.5's block structure at tiny widths; attention_head_dim is diffusers' legacy name for the head count.
TINY_SD_UNET = dict(
    sample_size=TINY_SD_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
)
TINY_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4, sample_size=TINY_SD_RESOLUTION,
)
TINY_SD_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=77, hidden_act="quick_gelu")
TINY_SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
    clip_sample=False,  # SD v1.5's scheduler config says so; without it DDIM's default clips to [-1, 1]
)
# initializer_range 0.2 gives the residual stream a pretrained ViT's scale (std ~1.7 at the embeddings here). At
# transformers' 0.02 it is 0.17, and tuner branches moved by Adam at lr 1e-3 swamp it: the bypass then stays at chance.
TINY_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                image_size=TINY_VIT_RESOLUTION, patch_size=8, initializer_range=0.2)

# Words the tokenizer learns whole, so captions like "a photo of a dog" are a few tokens each.
CAPTION_WORDS = """
a an the of in on at with and or to from by for near next over under behind front top side
is are sitting standing lying walking running flying riding holding eating playing looking parked
photo picture image painting drawing close up view small large big little old young two three some
dog dogs cat cats bird birds horse cow sheep bear zebra giraffe elephant fish flower flowers tree trees
man men woman women person people boy girl child children baby player group team
car cars bus truck train plane boat bike bicycle motorcycle street road city building house room
kitchen table chair bed couch window door wall floor field grass water beach sky snow mountain
food pizza cake plate bowl cup sandwich banana apple orange
red blue green yellow white black brown
""".split()


def _byte_symbols() -> list[str]:
    """CLIP's bytes_to_unicode: one printable symbol for each of the 256 bytes, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    remapped = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(remapped))]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that spell every word as one token: most frequent pair first, ties broken alphabetically."""
    pieces = [[*word[:-1], word[-1] + "</w>"] for word in sorted(set(words))]
    merges = []
    while True:
        pair_counts = Counter(pair for word in pieces for pair in zip(word, word[1:]))
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for n, word in enumerate(pieces):
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            pieces[n] = merged


def _write_clip_vocabulary(folder: Path, words: list[str]) -> None:
    """Write vocab.json and merges.txt in CLIP's layout: bytes, bytes + </w>, merged pieces, special tokens."""
    symbols = _byte_symbols()
    merges = _learn_merges(words)
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _empty_target(path: str | Path) -> Path:
    """The target folder as a Path, refusing one that already holds anything."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not an empty folder: pass a new folder name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_tiny_sd(path: str | Path, seed: int = 0, extra_words: tuple[str, ...] = (), max_length: int = 77) -> Path:
    """Write a tiny random SD v1.5-shaped pipeline (diffusers layout, safetensors) to `path` and return it.

    `extra_words` are learned whole by the tokenizer beside CAPTION_WORDS; `max_length` is the tokenizer's context
    (SD's is 77: every prompt is padded to it)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = _empty_target(path)
    _write_clip_vocabulary(path / "tokenizer", CAPTION_WORDS + list(extra_words))
    # tokenizer_config.json records local_files_only: pinned so the bytes do not depend on HF_HUB_OFFLINE.
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", model_max_length=max_length, local_files_only=True)
    text_config = CLIPTextConfig(**TINY_SD_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # fork_rng keeps the caller's global RNG untouched; the models draw their init from it in a fixed order.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SD_UNET)
        vae = AutoencoderKL(**TINY_SD_VAE)
        text_encoder = CLIPTextModel(text_config)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(TINY_SD_SCHEDULER),  # keeps clip_sample, which PNDM itself does not take
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_vit(path: str | Path, seed: int = 0, num_labels: int = 10) -> Path:
    """Write a tiny random ViT classifier and its image processor (transformers layout) to `path` and return it."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = _empty_target(path)
    id2label = {i: f"class_{i}" for i in range(num_labels)}
    config = ViTConfig(**TINY_VIT, num_labels=num_labels, id2label=id2label,
                       label2id={name: i for i, name in id2label.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    model.save_pretrained(path, safe_serialization=True)
    processor = ViTImageProcessor(size={"height": TINY_VIT_RESOLUTION, "width": TINY_VIT_RESOLUTION},
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor.save_pretrained(path)
    return path
