"""Unbinding is exact, every unbound tuner starts as the frozen model, and the free-scale forms train."""

import copy

import pytest
import torch
from conftest import perturb, run, tiny_unet, tiny_vit, unet_inputs, vit_inputs
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from restune_sd import TunerSpec, TuningConfig, attach, preset
from restune_sd.attention import ResTuningAttnProcessor
from restune_sd.tuners import PrefixTokens, PromptTokens


def bare_attention(cross: bool = False):
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=24 if cross else None, bias=True).eval()


def with_processor(attn, processor):
    attn = copy.deepcopy(attn)
    attn.set_processor(processor)
    return attn


def random_tokens(tuner):
    with torch.no_grad():
        for p in tuner.parameters():
            p.normal_(0, 0.5)
    return tuner


def test_lambda_prefix_reproduces_original_prefix_on_a_bare_attention():
    attn = bare_attention()
    x = torch.randn(2, 10, 32)
    prefix = random_tokens(PrefixTokens(6, 32, gate="lambda"))
    unbound = ResTuningAttnProcessor()
    unbound.tokens.append(prefix)

    # The original: Attn(x Wq, [K_pre; x Wk], [V_pre; x Wv]) Wo, written out with plain torch ops.
    q = attn.to_q(x).unflatten(-1, (4, 8)).transpose(1, 2)
    k = torch.cat([prefix.keys.expand(2, -1, -1), attn.to_k(x)], 1).unflatten(-1, (4, 8)).transpose(1, 2)
    v = torch.cat([prefix.values.expand(2, -1, -1), attn.to_v(x)], 1).unflatten(-1, (4, 8)).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    original = attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2))

    with torch.no_grad():
        assert torch.allclose(with_processor(attn, unbound)(x), original, atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_lambda_prompt_reproduces_original_prompt_tuning(cross):
    attn = bare_attention(cross)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 5, 24)
    prompt = random_tokens(PromptTokens(4, 24 if cross else 32, gate="lambda"))
    unbound = ResTuningAttnProcessor()
    unbound.tokens.append(prompt)
    with torch.no_grad():
        if cross:  # prompt tokens join the text tokens: the frozen cross-attention over [P; context]
            original = attn(x, torch.cat([prompt.tokens.expand(2, -1, -1), context], 1))
            tuned = with_processor(attn, unbound)(x, context)
        else:  # prompt tokens join the sequence; the rows of x are kept (the prompt rows D are discarded)
            original = attn(torch.cat([x, prompt.tokens.expand(2, -1, -1)], 1))[:, :10]
            tuned = with_processor(attn, unbound)(x)
    assert torch.allclose(tuned, original, atol=1e-5)


def test_several_lambda_branches_split_one_softmax():
    attn = bare_attention()
    x = torch.randn(2, 10, 32)
    prefix, prompt = random_tokens(PrefixTokens(3, 32, gate="lambda")), random_tokens(PromptTokens(5, 32, gate="lambda"))
    unbound, bound = ResTuningAttnProcessor(), ResTuningAttnProcessor()
    unbound.tokens.extend([prefix, prompt])
    bound.bound.extend([prefix, prompt])
    with torch.no_grad():
        assert torch.allclose(with_processor(attn, unbound)(x), with_processor(attn, bound)(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_lambda_branches_equal_bound_originals_inside_the_tiny_unet(kind):
    inputs = unet_inputs()
    bound = attach(tiny_unet(), TuningConfig(tuners=[TunerSpec(kind=kind, site="attn", dim=4)]))
    unbound = attach(tiny_unet(), TuningConfig(tuners=[TunerSpec(kind=f"res-{kind}", site="attn", dim=4, gate="lambda")]))
    perturb(bound, std=0.5)
    unbound.load_state_dict(
        {k.replace(".processor.bound.", ".processor.tokens."): v for k, v in bound.state_dict().items()}, strict=True
    )
    with torch.no_grad():
        reference = run(tiny_unet(), inputs)
        out_bound, out_unbound = run(bound, inputs), run(unbound, inputs)
    assert not torch.allclose(out_bound, reference, atol=1e-4)  # the tokens do change the output
    assert torch.allclose(out_bound, out_unbound, atol=1e-5)


UNET_UNBOUND = {
    "res-tuning preset": preset("res-tuning", "unet"),
    "bypass preset": preset("bypass", "unet"),
    "adapter preset": preset("adapter", "unet"),
    "lora preset": preset("lora", "unet"),
    "full preset": preset("full", "unet"),
    "res-adapter beside cross-attention": TuningConfig(tuners=[TunerSpec(kind="res-adapter", site="cross_attn", dim=8)]),
    "res-adapter beside whole blocks": TuningConfig(tuners=[TunerSpec(kind="res-adapter", site="block", dim=8)]),
    "res-prompt beside cross-attention": TuningConfig(tuners=[TunerSpec(kind="res-prompt", site="cross_attn", dim=3)]),
    "prefix+prompt attn, adapter ffn, in up blocks": TuningConfig(tuners=[
        TunerSpec(kind="res-prefix", site="attn", dim=4, blocks=r"up_blocks\..*"),
        TunerSpec(kind="res-prompt", site="self_attn", dim=4, blocks=r"up_blocks\..*"),
        TunerSpec(kind="res-adapter", site="ffn", dim=8, blocks=r"up_blocks\..*")]),
}


@pytest.mark.parametrize("name", UNET_UNBOUND)
def test_every_unbound_tuner_starts_as_the_frozen_unet(name):
    inputs = unet_inputs()
    with torch.no_grad():
        reference = run(tiny_unet(), inputs)
        tuned = run(attach(tiny_unet(), UNET_UNBOUND[name]), inputs)
    assert torch.equal(tuned, reference)


@pytest.mark.parametrize("name", ["res-tuning", "bypass", "adapter", "lora", "full", "linear"])
def test_every_unbound_tuner_starts_as_the_frozen_vit(name):
    x = vit_inputs()
    with torch.no_grad():
        reference = run(tiny_vit(), x)
        tuned = run(attach(tiny_vit(), preset(name, "vit")), x)
    assert torch.equal(tuned, reference)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_bound_originals_are_not_the_frozen_model_at_init(kind):
    """Documented: a bound prefix/prompt mixes its values into the softmax whatever they are; unbinding fixes this."""
    inputs = unet_inputs()
    with torch.no_grad():
        reference = run(tiny_unet(), inputs)
        tuned = run(attach(tiny_unet(), preset(kind, "unet")), inputs)
    assert not torch.allclose(tuned, reference, atol=1e-4)


def fit(model, inputs, target, steps=30):
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (run(model, inputs) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    moved = [not torch.equal(a, p) for a, p in zip(start, params)]
    return losses, moved


@pytest.mark.parametrize("kind", ["res-prefix", "res-prompt", "res-adapter"])
def test_free_scale_unbound_forms_train_in_the_unet(kind):
    config = TuningConfig(tuners=[TunerSpec(kind=kind, site="self_attn", dim=4)])
    model, teacher = attach(tiny_unet(), config), attach(tiny_unet(), config)
    perturb(teacher, seed=11, std=0.3)  # a target the tuner can reach: the same tuner, trained elsewhere
    inputs = unet_inputs()
    with torch.no_grad():
        target = run(teacher, inputs)
    losses, moved = fit(model, inputs, target)
    assert losses[-1] < 0.5 * losses[0]
    assert all(moved), "every tuner parameter (tokens and scale) gets a gradient and moves"


def test_res_tuning_trains_in_the_vit():
    model = attach(tiny_vit(), preset("res-tuning", "vit"))
    losses, moved = fit(model, vit_inputs(), torch.randn(2, 5, generator=torch.Generator().manual_seed(9)))
    assert losses[-1] < 0.5 * losses[0]
    assert all(moved)


def test_frozen_attention_processor_math_matches_diffusers():
    attn = bare_attention(cross=True)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 5, 24)
    with torch.no_grad():
        ours = with_processor(attn, ResTuningAttnProcessor())(x, context)
        theirs = with_processor(attn, AttnProcessor2_0())(x, context)
    assert torch.allclose(ours, theirs, atol=1e-6)
