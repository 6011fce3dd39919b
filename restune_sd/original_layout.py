"""A diffusers SD v1.x pipeline's UNet, VAE and text encoder under the keys of an original-layout (LDM/CompVis)
single-file checkpoint, as A1111, ComfyUI and diffusers' `from_single_file` read it: the reverse of diffusers'
single-file conversion, as its scripts/convert_diffusers_to_original_stable_diffusion.py does it, for any
layers_per_block and block count."""

import torch

# Inner renames of a UNet resnet and of the VAE's attention (the VAE's resnets rename their shortcut alone).
RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
# The prefix of each part in the single file. The text encoder's keys are CLIPTextModel's below `text_model.` (diffusers'
# convert_ldm_clip_checkpoint strips `cond_stage_model.transformer.`), which transformers 5 leaves out of state_dict().
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."


def unet_prefixes(config) -> list[tuple[str, str, list]]:
    """(diffusers prefix, LDM prefix, inner renames) of every UNet block."""
    n, blocks = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0.", []), ("time_embedding.linear_2.", "time_embed.2.", []),
             ("conv_in.", "input_blocks.0.0.", []), ("conv_norm_out.", "out.0.", []), ("conv_out.", "out.2.", []),
             ("mid_block.attentions.0.", "middle_block.1.", [])]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", RESNET) for j in range(2)]
    for i in range(blocks):
        for j in range(n):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.0.", RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.1.", [])]
        for j in range(n + 1):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(n + 1) * i + j}.0.", RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(n + 1) * i + j}.1.", [])]
        has_attention = "CrossAttn" in config["up_block_types"][i]
        pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n + 1) * (i + 1)}.0.op.", []),
                  (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(n + 1) * i + n}.{2 if has_attention else 1}.", [])]
    return pairs


def vae_prefixes(config) -> list[tuple[str, str, list]]:
    """(diffusers prefix, LDM prefix, inner renames) of every VAE block; the decoder's blocks count down in LDM."""
    n, blocks = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [(f"{part}.conv_norm_out.", f"{part}.norm_out.", []) for part in ("encoder", "decoder")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", VAE_RESNET) for j in range(2)]
    for i in range(blocks):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET) for j in range(n)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}.", VAE_RESNET)
                  for j in range(n + 1)]
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", []),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.", [])]
    return pairs


def rename(key: str, pairs) -> str:
    """A diffusers key in the original layout: its first matching prefix swapped, then the inner renames."""
    for hf, sd, inner in pairs:
        if key.startswith(hf):
            rest = key[len(hf):]
            for a, b in inner:
                rest = rest.replace(a, b)
            return sd + rest
    return key


def original_layout(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """Every weight of the three models (diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
    CLIPTextModel) under the keys an SD v1.x single-file checkpoint uses, as contiguous tensors ready to save."""
    unet_pairs = unet_prefixes(unet.config)
    state = {UNET_PREFIX + rename(k, unet_pairs): v for k, v in unet.state_dict().items()}
    vae_pairs = vae_prefixes(vae.config)
    for k, v in vae.state_dict().items():
        key = rename(k, vae_pairs)
        if ".attn_1." in key and v.ndim == 2:
            v = v[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        state[VAE_PREFIX + key] = v
    state |= {TEXT_PREFIX + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    return {k: v.detach().contiguous() for k, v in state.items()}
