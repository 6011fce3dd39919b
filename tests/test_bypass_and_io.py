"""Bypass isolation, saving and loading tuners, the xformers/SDPA guard, configs, and the paper's budgets."""

import json

import pytest
import torch
from conftest import perturb, run, tiny_unet, tiny_vit, unet_inputs, vit_inputs
from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

from restune_sd import TunerSpec, TuningConfig, UserError, attach, load_tuner, parameter_summary, preset, save_tuner
from restune_sd.attention import ResTuningAttnProcessor, guard_processors, set_attention_backend
from restune_sd.config import load_config
from restune_sd.models import build_architecture


def count_saved(fn) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = fn()
    return len(saved), out


def unet_head(model, x):
    return model.conv_out(model.conv_act(model.conv_norm_out(x)))


def bypass_preset(kind: str, form: str) -> TuningConfig:
    config = preset("bypass", kind)
    config.bypass.form = form
    return config


@pytest.mark.parametrize("form", ["correction", "paper"])
def test_unet_bypass_backbone_gets_no_gradient_and_saves_nothing(form):
    model = attach(tiny_unet(), bypass_preset("unet", form))
    inputs = unet_inputs()
    perturb(model)
    n_full, out = count_saved(lambda: run(model, inputs))
    out.square().mean().backward()

    tuner = set(model.restune.param_names)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in tuner), name

    # The ladder and the frozen output head alone, on features of the same shapes, save exactly as many tensors:
    # the backbone's forward saved none.
    feats = {}
    hooks = [model.mid_block.register_forward_pre_hook(lambda m, a, k: feats.__setitem__("root", k.get("hidden_states", a[0] if a else None)), with_kwargs=True)]
    hooks += [m.register_forward_hook(lambda m, a, o: feats.setdefault("stems", []).append(o)) for m in [model.mid_block, *model.up_blocks]]
    with torch.no_grad():
        run(model, inputs)
    for h in hooks:
        h.remove()
    n_bypass_only, _ = count_saved(lambda: unet_head(model, model.restune_bypass.ladder(feats["root"], feats["stems"])))
    assert n_full == n_bypass_only

    n_inside, _ = count_saved(lambda: run(attach(tiny_unet(), preset("res-tuning", "unet")), inputs))
    assert n_inside > 5 * n_full  # the counting sees a backbone that does save activations


@pytest.mark.parametrize("form", ["correction", "paper"])
def test_vit_bypass_backbone_gets_no_gradient_and_saves_nothing(form):
    model = attach(tiny_vit(), bypass_preset("vit", form))
    x = vit_inputs()
    n_full, logits = count_saved(lambda: run(model, x))
    logits.logsumexp(-1).mean().backward()
    trained = set(model.restune.param_names + model.restune.head_names)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trained), name
    ladder_input = [torch.randn(2, 17, 32) for _ in range(4)]
    n_bypass_only, _ = count_saved(
        lambda: model.classifier(model.vit.layernorm(model.restune_bypass.ladder(ladder_input[0], ladder_input[1:]))[:, 0])
    )
    assert n_full == n_bypass_only
    assert torch.is_grad_enabled()  # the grad switch is restored after the forward


def test_bypass_restores_grad_mode_after_an_error():
    model = attach(tiny_unet(), preset("bypass", "unet"))
    x, t, c = unet_inputs()
    with pytest.raises(Exception):
        model(x, t, torch.randn(2, 7, 5))  # wrong text width fails inside the backbone
    assert torch.is_grad_enabled()


UNET_CASES = ["res-tuning", "bypass", "adapter", "prefix", "prompt", "lora"]
VIT_CASES = ["res-tuning", "bypass", "prefix", "lora", "linear"]


@pytest.mark.parametrize("name", UNET_CASES)
def test_unet_tuner_saves_and_loads_into_a_fresh_plain_unet(name, tmp_path):
    tuned = attach(tiny_unet(), preset(name, "unet"))
    perturb(tuned)
    inputs = unet_inputs()
    with torch.no_grad():
        expected = run(tuned, inputs)
    save_tuner(tuned, tmp_path / "tuner")
    loaded = load_tuner(tiny_unet(), tmp_path / "tuner")
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), expected)
    meta = json.loads((tmp_path / "tuner" / "tuner_config.json").read_text())
    assert meta["tuning"]["name"] == name and meta["backbone"]["kind"] == "unet"


@pytest.mark.parametrize("name", VIT_CASES)
def test_vit_tuner_with_its_head_loads_into_a_plain_vit_with_another_head(name, tmp_path):
    tuned = attach(tiny_vit(num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2}),
                   preset(name, "vit"))
    perturb(tuned)
    x = vit_inputs()
    with torch.no_grad():
        expected = run(tuned, x)
    save_tuner(tuned, tmp_path / "tuner")
    loaded = load_tuner(tiny_vit(num_labels=5), tmp_path / "tuner")
    with torch.no_grad():
        assert torch.equal(run(loaded, x), expected)
    assert loaded.config.id2label[2] == "owl"


def test_load_tuner_accepts_a_run_directory(tmp_path):
    tuned = attach(tiny_unet(), preset("res-tuning", "unet"))
    save_tuner(tuned, tmp_path / "run" / "tuner")
    assert load_tuner(tiny_unet(), tmp_path / "run").restune.config.name == "res-tuning"


def test_incompatible_backbones_fail_with_one_clear_message(tmp_path):
    save_tuner(attach(tiny_unet(), preset("res-tuning", "unet")), tmp_path / "unet-tuner")
    with pytest.raises(UserError, match="block_out_channels"):
        load_tuner(tiny_unet(block_out_channels=(16, 32, 32, 64)), tmp_path / "unet-tuner")
    with pytest.raises(UserError, match="trained for a unet"):
        load_tuner(tiny_vit(), tmp_path / "unet-tuner")
    with pytest.raises(UserError, match="not a tuner folder"):
        load_tuner(tiny_unet(), tmp_path)


def test_save_never_overwrites_and_leaves_no_partial_folder(tmp_path):
    tuned = attach(tiny_unet(), preset("lora", "unet"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.json").write_text("{}")
    with pytest.raises(UserError, match="already holds files"):
        save_tuner(tuned, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["results.json"]
    save_tuner(tuned, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "taken"]  # no staging folder left behind


def test_switching_attention_backends_never_drops_a_tuner():
    tuned = attach(tiny_unet(), TuningConfig(tuners=[TunerSpec(kind="res-prefix", site="attn", dim=4)]))
    perturb(tuned)
    inputs = unet_inputs()
    with torch.no_grad():
        expected = run(tuned, inputs)
    processors = {name: processor for name, (_, processor) in tuned._restune_processors.items()}

    tuned.set_attn_processor(AttnProcessor2_0())  # what diffusers' SDPA switch does
    with torch.no_grad():
        assert torch.equal(run(tuned, inputs), expected)  # put back before the forward
    with pytest.raises(ValueError):  # diffusers itself refuses to reset processors it does not know
        tuned.set_default_attn_processor()
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) == parameter_summary(tuned)["tuner_params"]
    with torch.no_grad():
        assert torch.equal(run(tuned, inputs), expected)

    tuned.set_attn_processor(XFormersAttnProcessor())  # what enable_xformers_memory_efficient_attention sets
    assert guard_processors(tuned) == len(processors)
    for name, processor in processors.items():
        assert tuned.get_submodule(name).processor is processor and processor.backend == "xformers"
    assert set_attention_backend(tuned, "sdpa") == "sdpa"
    assert all(isinstance(p, ResTuningAttnProcessor) and p.backend == "sdpa" for p in processors.values())
    with torch.no_grad():
        assert torch.equal(run(tuned, inputs), expected)


def test_xformers_on_a_machine_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message; on CUDA the xformers path is exercised by the GPU benchmark")
    with pytest.raises(UserError, match="--attention sdpa"):
        set_attention_backend(tiny_unet(), "xformers")


def test_configs_that_match_nothing_or_train_nothing_are_errors(tmp_path):
    with pytest.raises(UserError, match="matches no transformer block") as raised:
        attach(tiny_unet(), TuningConfig(tuners=[TunerSpec(kind="res-adapter", site="ffn", blocks="down_blocks.9.*")]))
    assert "'down_blocks.9.*'" in str(raised.value)
    with pytest.raises(UserError, match="trains no parameter"):
        attach(tiny_unet(), TuningConfig(name="empty"))
    with pytest.raises(UserError, match="match no module"):
        attach(tiny_unet(), TuningConfig(lora={"rank": 4, "targets": ["nonexistent_proj"]}))
    with pytest.raises(UserError, match="unknown tuner kind"):
        TunerSpec(kind="res-magic", site="ffn")
    with pytest.raises(UserError, match="beside attention"):
        TunerSpec(kind="res-prefix", site="ffn")
    with pytest.raises(UserError, match="cannot be combined"):
        TuningConfig(bypass={}, tuners=[{"kind": "res-adapter", "site": "ffn"}])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tuners:\n  - kind: res-adapter\n    site: ffn\n    bottleneck: 8\n")
    with pytest.raises(UserError, match="unknown field.*bottleneck"):
        load_config(bad)


def test_yaml_config_combines_tuners_in_chosen_blocks(tmp_path):
    path = tmp_path / "combo.yaml"
    path.write_text(
        "tuners:\n"
        "  - {kind: res-prefix, site: self_attn, dim: 4, blocks: 'up_blocks\\..*'}\n"
        "  - {kind: res-adapter, site: ffn, dim: 8, blocks: 'down_blocks\\.0\\..*'}\n"
    )
    model = attach(tiny_unet(), load_config(path))
    rows = {r["module"]: r["params"] for r in parameter_summary(model)["modules"]}
    assert all(m.startswith("up_blocks") and m.endswith("attn1.processor") for m in rows if "processor" in m)
    assert [m for m in rows if "restune_ffn" in m] == ["down_blocks.0.attentions.0.transformer_blocks.0.restune_ffn_input"]
    assert model.restune.config.name == "combo"


# The paper's budgets (docs/method.md §3) on the real architectures with random weights, built on the meta device.
# `target` is the paper's row as it counts it: the ViT rows of VTAB-1K include the head, 38,050 parameters on
# average over its 19 tasks (768 features x 49.5 classes + biases), so `with_head` adds that average.
VTAB_MEAN_HEAD = 38_050
BUDGETS = [
    ("sd15", "unet", "res-tuning", 2.54e6, 0.005, False),  # reconstructed recipe
    ("sd15", "unet", "bypass", 3.76e6, 0.005, False),  # reconstructed recipe
    ("sd15", "unet", "adapter", 2.51e6, 0.005, False),
    ("sd15", "unet", "prefix", 4.99e6, 0.005, False),
    ("sd15", "unet", "prompt", 1.25e6, 0.005, False),
    ("sd15", "unet", "lora", 9.96e6, 0.005, False),
    ("vit-b16", "vit", "res-tuning", 470_136, 0.001, False),  # reconstructed; the paper's VTAB row is 0.55M with the head
    ("vit-b16", "vit", "bypass", 387_312, 0.001, False),  # reconstructed; the paper's row is 0.42M with the head
    ("vit-b16", "vit", "adapter", 1.82e6, 0.005, True),
    ("vit-b16", "vit", "prompt", 0.60e6, 0.005, True),  # VPT-Deep
    ("vit-b16", "vit", "lora", 0.29e6, 0.02, False),
]


@pytest.mark.parametrize("arch,kind,name,target,tolerance,with_head", BUDGETS)
def test_presets_reproduce_the_papers_budgets(arch, kind, name, target, tolerance, with_head):
    summary = parameter_summary(attach(build_architecture(arch), preset(name, kind)))
    counted = summary["tuner_params"] + (VTAB_MEAN_HEAD if with_head else 0)
    assert abs(counted - target) <= tolerance * target, counted


def test_the_familiar_small_lora_keeps_its_name():
    assert parameter_summary(attach(build_architecture("sd15"), preset("lora-r4", "unet")))["tuner_params"] == 797_184


def test_sd15_architecture_has_the_papers_size():
    summary = parameter_summary(build_architecture("sd15"))
    assert summary["total_params"] == 859_520_964  # SD v1.5's UNet: 859.52M


def as_format_1(folder, extra_weights: dict | None = None) -> None:
    """Rewrite a saved tuner as restune-sd 0.1 wrote it: format 1, no checksum, optional extra weights."""
    from safetensors.torch import load_file, save_file

    meta = json.loads((folder / "tuner_config.json").read_text())
    meta["format"] = "restune-sd-tuner/1"
    meta.pop("weights_sha256", None)
    meta.pop("config_sha256", None)
    if meta["tuning"].get("bypass"):
        meta["tuning"]["bypass"].pop("form")
    (folder / "tuner_config.json").write_text(json.dumps(meta))
    save_file({**load_file(folder / "tuner.safetensors"), **(extra_weights or {})}, folder / "tuner.safetensors")


def test_tuners_of_format_1_load_or_are_refused_in_one_line(tmp_path):
    tuned = attach(tiny_unet(), preset("prefix", "unet"))  # bound prefix: format 1 stored an unused scale per tuner
    perturb(tuned)
    inputs = unet_inputs()
    with torch.no_grad():
        expected = run(tuned, inputs)
    save_tuner(tuned, tmp_path / "prefix")
    stale = {f"{name}.processor.bound.0.scale": torch.tensor(1.0) for name in tuned._restune_processors}
    as_format_1(tmp_path / "prefix", stale)
    with torch.no_grad():
        assert torch.equal(run(load_tuner(tiny_unet(), tmp_path / "prefix"), inputs), expected)

    save_tuner(attach(tiny_unet(), preset("bypass", "unet")), tmp_path / "bypass")
    as_format_1(tmp_path / "bypass")
    with pytest.raises(UserError, match="bypass saved by restune-sd 0.1"):
        load_tuner(tiny_unet(), tmp_path / "bypass")
