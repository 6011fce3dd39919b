"""Multi-task inference: bypass tuners share one backbone forward and predict exactly what each predicts alone."""

import torch
from conftest import perturb, tiny_vit, vit_inputs

from restune_sd import attach, load_tuner, preset, save_tuner
from restune_sd.multitask import MultiTask


def saved_tuner(path, name: str, num_labels: int, seed: int):
    labels = {i: f"{path.name}-{i}" for i in range(num_labels)}
    model = attach(tiny_vit(num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()}),
                   preset(name, "vit"))
    perturb(model, seed=seed, std=0.2)
    return save_tuner(model, path)


def test_bypass_tasks_share_one_forward_and_equal_each_tuner_alone(tmp_path):
    tuners = {f"task{i}": saved_tuner(tmp_path / f"task{i}", "bypass", 3 + i, seed=i) for i in range(3)}
    tuners["lora"] = saved_tuner(tmp_path / "lora", "lora", 4, seed=9)
    x = vit_inputs(batch=4)
    backbone = tiny_vit()
    multi = MultiTask(backbone, {name: str(path) for name, path in tuners.items()})
    calls = []
    backbone.vit.layers[0].register_forward_hook(lambda *a: calls.append(1))
    assert [t.name for t in multi.shared] == ["task0", "task1", "task2"] and [t.name for t in multi.separate] == ["lora"]
    together = multi(x)
    assert len(calls) == 1  # the lora task runs on its own copy; the three bypass tasks on one shared forward

    assert list(together) == ["task0", "task1", "task2", "lora"]
    for name, path in tuners.items():
        with torch.no_grad():
            alone = load_tuner(tiny_vit(), path)(pixel_values=x).logits
        assert torch.equal(together[name], alone), name
    assert multi.shared[1].id2label[2] == "task1-2"
