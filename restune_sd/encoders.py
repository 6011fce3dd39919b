"""The frozen VAE and text encoder of a diffusion run, with their caches on disk: one safetensors file per latent (in
a store of latent_cache.py: shared by runs, or the run's own) and per caption, written once and read on demand; and
encoding a data set's latents once before training, as kohya does, where every sample's crop is known in advance."""

import hashlib
import os
import secrets
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from restune_sd.files import writing

ENCODE_CHUNK = 8  # images per VAE call when encoding ahead; fixed, so the latents do not depend on the process count


def latent_key(batch: dict) -> list[str]:
    """The cache key of each sample's VAE latent: the image, whether it was flipped, and the size it was cropped to
    (its aspect-ratio bucket), e.g. "12-1-64x96"; a micro-batch's images share one size."""
    height, width = batch["pixel_values"].shape[-2:]
    return keys_of(batch["index"].tolist(), batch["flipped"].tolist(), (width, height))


def keys_of(indices: list[int], flips: list[bool], size: tuple[int, int]) -> list[str]:
    return [f"{index}-{int(flipped)}-{size[0]}x{size[1]}" for index, flipped in zip(indices, flips)]


class TensorFiles:
    """A folder of small safetensors files, one per key, each written atomically once; a damaged one reads as absent."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        try:
            return load_file(self.path(key))
        except Exception:  # only a cache (safetensors, never pickle): a missing or damaged entry is recomputed
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write to a file of this process's own, then rename: processes writing one key never meet half a file."""
        path = self.path(key)
        # pid and a random part: runs on two machines sharing the folder may have one pid
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        with writing(path, "free some space"):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                try:
                    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, tmp)
                except OSError:
                    raise
                except Exception as error:  # safetensors reports a failed write (e.g. a full disk) as its own error
                    raise OSError(str(error).splitlines()[0]) from None
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:32]


def text_embeddings(text_encoder, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
    """The text encoder's last hidden state, or with `clip_skip` N the hidden state N layers before it through the
    final layer norm, as diffusers' StableDiffusionPipeline.encode_prompt(..., clip_skip=N) computes it."""
    if not clip_skip:
        return text_encoder(input_ids)[0]
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    # transformers 5.6 moved CLIPTextModel's layers up from its `text_model` (which diffusers 0.42 still reads).
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def long_captions(captions, tokenizer) -> str | None:
    """One line counting the distinct captions longer than the text encoder's context (77 tokens for SD's CLIP, start
    and end tokens included), which it cuts; None when there are none."""
    distinct = list(dict.fromkeys(captions))
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(distinct, truncation=False, verbose=False).input_ids] if distinct else []
    long = [caption for caption, length in zip(distinct, lengths) if length > limit]
    if not long:
        return None
    return (f"{len(long)} of {len(distinct)} distinct captions are longer than the text encoder's {limit} tokens and "
            f"are cut there (the first: {long[0][:60]!r}...): shorten them, or put what matters first")


class Encoders:
    """The frozen VAE and text encoder; latents and text embeddings come from their caches where these hold them.
    Text embeddings are taken `clip_skip` layers before the text encoder's last (see text_embeddings). With
    `text_trains` (a LoRA on the text encoder) they are computed with autograd, and never cached."""

    def __init__(self, comps, dtype, latents: Path | None = None, texts: Path | None = None, clip_skip: int = 0,
                 text_trains: bool = False):
        self.comps, self.dtype, self.clip_skip, self.text_trains = comps, dtype, clip_skip, text_trains
        if isinstance(latents, Path):  # a run's own folder, keyed by sample
            from restune_sd.latent_cache import RunLatents

            latents = RunLatents(latents)
        self.latents = latents  # a latent store of restune_sd.latent_cache, or None
        self.counts = {"latents_encoded": 0, "latents_from_cache": 0}  # this process's VAE encodes and cache hits
        self.texts = TensorFiles(texts) if texts and not text_trains else None

    def text(self, captions: list[str], device) -> torch.Tensor:
        with torch.set_grad_enabled(self.text_trains and torch.is_grad_enabled()):
            return self.embed(captions, device)

    def embed(self, captions: list[str], device) -> torch.Tensor:
        found = {c: self.texts.get(caption_key(c)) for c in dict.fromkeys(captions)} if self.texts else {}
        found = {c: saved["embedding"] for c, saved in found.items() if saved is not None}
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            tokens = self.comps.tokenizer(missing, padding="max_length", truncation=True,
                                          max_length=self.comps.tokenizer.model_max_length, return_tensors="pt")
            embeddings = text_embeddings(self.comps.text_encoder, tokens.input_ids.to(device), self.clip_skip)
            for caption, embedding in zip(missing, embeddings):
                found[caption] = embedding
                if self.texts:
                    self.texts.put(caption_key(caption), {"embedding": embedding})
        return torch.stack([found[c].to(device) for c in captions])

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor, keys: list[str], device):
        """Each sample's latent mean and std: from the cache where it holds a sound entry for the sample's key (the
        value first computed for it), else encoded now, once per distinct key, and with a cache kept. `keys` are the
        samples' own (latent_key); a shared store keys them by their pixels instead."""
        from restune_sd.latent_cache import latent_shape, sound_moments

        keys = self.latents.keys(pixels, keys) if self.latents else [str(i) for i in range(len(pixels))]
        shape = latent_shape(self.comps.vae.config, pixels.shape[-2:])
        saved = {key: self.latents.get(key) for key in dict.fromkeys(keys)} if self.latents else {}
        saved = {key: entry for key, entry in saved.items() if sound_moments(entry, shape)}
        self.counts["latents_from_cache"] += sum(key in saved for key in keys)
        missing = [i for i, key in enumerate(keys) if key not in saved and keys.index(key) == i]  # first of each key
        if missing:
            # One image per VAE call: a latent is then a function of its pixels alone, never of the batch it was
            # encoded in, so cached, encoded-ahead and per-step latents agree to the bit, also across runs.
            dists = [self.comps.vae.encode(pixels[[i]].to(device, self.dtype)).latent_dist for i in missing]
            means, stds = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
            self.counts["latents_encoded"] += len(missing)
            for i, mean, std in zip(missing, means, stds):
                saved[keys[i]] = {"mean": mean, "std": std}
                if self.latents:
                    self.latents.put(keys[i], saved[keys[i]])
        return (torch.stack([saved[k]["mean"].to(device) for k in keys]),
                torch.stack([saved[k]["std"].to(device) for k in keys]))

    def encode_ahead(self, dataset, flips: tuple[bool, ...], rank: int, world: int, device, show: bool) -> int:
        """Encode every latent the run can ask for (each image at its crop, with each flip in `flips`) into the cache,
        this process taking every `world`-th chunk of ENCODE_CHUNK same-size images; returns how many it encoded."""
        from tqdm.auto import tqdm

        groups = {}  # a chunk stacks: one crop size, one flip
        for flip in flips:
            for index in self.latents.distinct(dataset):  # a shared store looks up an image listed N times once
                groups.setdefault((dataset.crop_size(index), flip), []).append(index)
        chunks = [[(index, flip) for index in members[i:i + ENCODE_CHUNK]]
                  for (_, flip), members in sorted(groups.items()) for i in range(0, len(members), ENCODE_CHUNK)]
        before = self.counts["latents_encoded"]
        for chunk in tqdm(chunks[rank::world], desc="encoding latents", unit="chunk", disable=not show):
            # A resumed run finds its chunks on disk: with the run's own store only existence is checked, before any
            # image is decoded (a damaged file is encoded again when a step first reads it; a corrupt image's key is
            # missing, so its replacement is decoded and encoded here). A shared store needs the pixels for its keys.
            indices, flips = [index for index, _ in chunk], [flip for _, flip in chunk]
            if self.latents.holds(keys_of(indices, flips, dataset.crop_size(indices[0]))):
                continue
            items = [dataset.fixed_item(index, flip) for index, flip in chunk]
            batch = {"pixel_values": torch.stack([pixels for _, pixels in items]),
                     "index": torch.tensor([current for current, _ in items]), "flipped": torch.tensor(flips)}
            self.latent_moments(batch["pixel_values"], latent_key(batch), device)
        return self.counts["latents_encoded"] - before
