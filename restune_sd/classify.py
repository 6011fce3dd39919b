"""Tuning a frozen ViT classifier on labelled images: `classify(cfg) -> results` on the shared training scaffold,
top-1 evaluation of the final model (on data of the classes it was trained for) and multi-task prediction; the
VTAB-1K sweep and its table live in vtab.py.

Defaults follow the VTAB-1K protocol of docs/method.md §4: 224 px direct resize, AdamW wd 1e-4, cosine with 10 warm-up
epochs, 100 epochs, batch 64, and the learning rate and clipping of the preset's recipe (recipes.py). FGVC layouts
use VPT's crop protocol and normalisation (datasets/classification.py); others the model's own normalisation.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from restune_sd.bounds import MAX_RESOLUTION, require_number
from restune_sd.errors import UserError
from restune_sd.loop import WHOLE, Job, RunConfig, Session, fit
from restune_sd.recipes import RECIPE_FIELDS, fill_recipe, recipe
from restune_sd.sweep_spec import expand_sweep
from restune_sd.sweep_vit import class_losses, install_variants, sweep_variants, swept_classifier
from restune_sd.taps import CACHE_TAPS, FOLDER as TAPS_FOLDER, with_cached_taps

DEFAULT_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # google/vit-base-patch16-224-in21k's own
MAX_BATCH_SIZE = 1024  # images per forward when scoring or predicting: far above what one accelerator holds at 224 px
SHOWN_CLASSES = 8  # class names a mismatch message lists before "..."


@dataclass(kw_only=True)
class ClassifyConfig(RunConfig):
    """Everything a classifier tuning run depends on; written to RUN_DIR/config.json."""

    model: str = field(metadata={"help": "transformers ViT folder or hub id, or vit-b16 (random weights)"})
    data: str = field(metadata={"help": "PREFIX:ROOT labelled data (vtab:, cub:, nabirds:, flowers102:, dogs:, cars:, classfolder:)"})
    tuner: str = "res-tuning"
    sweep: list = field(default_factory=list, metadata={"help": "bypass or linear variants trained on one frozen forward "
                                                        "(or cached taps), each with its own head: NAME=V1,V2,... "
                                                        "(several: a grid) or a YAML/JSON list of settings; recorded as "
                                                        "the list of variants"})
    split: str = "train"
    eval_split: str = "test"
    resolution: int | None = None
    random_flip: bool | None = field(default=None, metadata={"help": "random flips of training images; None: the data's "
                                                                    "protocol (FGVC: on, VTAB-1K and class folders: off)"})
    cache_taps: str = field(default="auto", metadata={"help": "bypass and linear: compute what each training image shows "
                                                              "them from the frozen ViT once and train on it: yes, no, or "
                                                              "auto (yes when nothing random touches the images and the "
                                                              "run draws each at least once)"})
    warmup_epochs: int = 10
    eval_batch_size: int = 64
    epochs: int = 100
    batch_size: int = 64
    learning_rate: float | None = field(default=None, metadata={"help": "AdamW learning rate; None: the preset's recipe"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "gradient clipping (0: off); None: the recipe's"})
    weight_decay: float = 1e-4
    lr_scheduler: str = "cosine"

    SAFE_ON_RESUME: ClassVar[tuple[str, ...]] = RunConfig.SAFE_ON_RESUME + ("eval_split", "eval_batch_size", "cache_taps")
    BOUNDS: ClassVar[dict] = {**RunConfig.BOUNDS, "warmup_epochs": {**WHOLE, "minimum": 0},
                              "eval_batch_size": {**WHOLE, "minimum": 1},
                              "resolution": {**WHOLE, "minimum": 1, "maximum": MAX_RESOLUTION, "optional": True}}

    def __post_init__(self):
        if self.optimizer == "prodigy" and self.learning_rate is None:
            self.learning_rate = 1.0  # Prodigy multiplies its own step-size estimate by it: 1.0 is its recipe
        left_out = [name for name in RECIPE_FIELDS if getattr(self, name) is None]
        fill_recipe(self)  # before the bounds are checked: the settings left out take the preset's recipe
        if self.random_flip is None:
            self.random_flip = protocol_crops(self.data)
        super().__post_init__()
        if self.cache_taps not in CACHE_TAPS:
            raise UserError(f"unknown --cache-taps {self.cache_taps!r}: use {', '.join(CACHE_TAPS)}")
        self.sweep = [self.variant_recipe(variant, left_out) for variant in expand_sweep(self, "vit")]

    def warmup(self, steps_per_epoch: int) -> int:
        """Warm-up in steps: --warmup-steps if given, else --warmup-epochs whole epochs."""
        return self.warmup_steps or self.warmup_epochs * steps_per_epoch

    def variant_recipe(self, variant: dict, left_out: list[str]) -> dict:
        """A sweep variant of another tuner with the recipe settings left out as its tuner's recipe has them (as it
        would train alone), where they differ from the run's tuner's."""
        chosen = recipe(variant.get("tuner", self.tuner))
        return {**variant, **{name: getattr(chosen, name) for name in left_out
                              if name not in variant and getattr(chosen, name) != getattr(self, name)}}


def protocol_crops(data: str) -> bool:
    """Whether the layout of a PREFIX:ROOT spec follows VPT's FGVC protocol (crops and flips); False if unknown."""
    from restune_sd.datasets.classification import REGISTRY

    layout = REGISTRY.get(str(data).partition(":")[0].lower())
    return bool(layout and layout.crop)


def normalisation(model: str) -> tuple[tuple, tuple]:
    """The image mean and std of a model's preprocessor config (the ViT's pretraining statistics)."""
    from restune_sd.models import check_vit_folder

    check_vit_folder(model)  # a damaged model folder is one line before any of it is read
    config = Path(model) / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return tuple(data.get("image_mean", DEFAULT_NORMALISATION[0])), tuple(data.get("image_std", DEFAULT_NORMALISATION[1]))
    if not Path(model).exists() and model != "vit-b16":
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(model)
            return tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, AttributeError):
            pass
    return DEFAULT_NORMALISATION


def frozen_vit(model: str, device="cpu"):
    """The ViT as saved, loaded without progress bars or a report on its head (every caller replaces the head)."""
    import transformers

    from restune_sd.models import load_vit, quiet_loading

    quiet_loading()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return load_vit(model, device=str(device))
    finally:
        transformers.logging.set_verbosity(verbosity)


def labelled_model(model: str, classes: list[str], device):
    """The frozen ViT with a new head sized to the task (initialised from torch's RNG), its labels named."""
    vit = frozen_vit(model, device)
    vit.classifier = torch.nn.Linear(vit.config.hidden_size, len(classes)).to(device)
    vit.num_labels = vit.config.num_labels = len(classes)
    vit.config.id2label = dict(enumerate(classes))
    vit.config.label2id = {name: i for i, name in enumerate(classes)}
    return vit


def model_resolution(model: str) -> int:
    """The image side a ViT folder's config names; 224 (ViT-B/16's) for a hub id or `vit-b16`."""
    config = Path(model) / "config.json"
    return int(json.loads(config.read_text()).get("image_size", 224)) if config.is_file() else 224


def cross_entropy(model, batch: dict, step: int) -> torch.Tensor:
    return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits.float(), batch["label"])


@torch.no_grad()
def top1(model, dataset, batch_size: int, device) -> float | list[float]:
    """Top-1 accuracy of `model` over every item of `dataset`, in order; one per variant of a sweep's VariantRows."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    correct = 0
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        correct = correct + (logits.argmax(-1).cpu() == batch["label"]).sum(-1)  # [K] for a sweep's [K, B, classes]
    model.train(was_training)
    counts = torch.as_tensor(correct).tolist()
    return [count / len(dataset) for count in counts] if isinstance(counts, list) else counts / len(dataset)


def classifier_job(session: Session) -> Job:
    """The frozen ViT with its tuner and new head, the labelled data and cross-entropy; top-1 on the eval split at the end."""
    from restune_sd.datasets import build_classification_dataset
    from restune_sd.inject import attach

    from restune_sd.datasets.classification import classification_layout

    cfg = session.cfg
    variants = sweep_variants(session)  # with --sweep: session.tuning becomes the tuner the backbone is built with
    layout = classification_layout(cfg.data)
    mean, std = layout.normalisation or normalisation(cfg.model)  # the protocol's (FGVC: ImageNet's) or the model's
    resolution = cfg.resolution or model_resolution(cfg.model)

    def data(split: str, train: bool):
        return build_classification_dataset(cfg.data, split=split, resolution=resolution, mean=mean, std=std,
                                            random_flip=train and bool(cfg.random_flip), seed=cfg.seed, train=train)

    train_set, eval_set = data(cfg.split, True), data(cfg.eval_split, False)  # checked before the model loads
    torch.manual_seed(cfg.seed)  # the new head's and the tuners' random initialisation
    vit = labelled_model(cfg.model, train_set.classes, session.device)
    if vit.config.image_size != resolution:  # its position embeddings are for one image size
        raise UserError(f"--resolution {resolution} does not fit {cfg.model}, which takes {vit.config.image_size} px images: "
                        "leave --resolution out")
    start = torch.get_rng_state()  # where the tuner's initialisation draws from: each sweep variant's starts here too
    model = attach(vit, session.tuning)
    sweep = install_variants(model, variants, session, start) if variants else None

    def finish(tuned) -> dict:
        return {"eval_split": cfg.eval_split, "top1": top1(tuned, eval_set, cfg.eval_batch_size, session.device),
                "num_classes": train_set.num_classes}

    preprocessing = {"resolution": resolution, "image_mean": list(mean), "image_std": list(std), "resize_crop": layout.crop}
    job = Job(model, train_set, cross_entropy, record=preprocessing, finish=finish, tuner_extra=preprocessing,
              sample_losses=lambda model, batch, step: class_losses(model(pixel_values=batch["pixel_values"]).logits,
                                                                    batch["label"]))
    job = with_cached_taps(job, session, crops=layout.crop, batch_size=cfg.eval_batch_size)
    return swept_classifier(job, sweep) if sweep else job


def classify(cfg: ClassifyConfig, given: set[str] | None = None) -> dict:
    """Tune (or resume tuning) a ViT classifier; results also in RUN_DIR/results.json, with top-1 on the eval split."""
    return fit(cfg, "vit", classifier_job, given, early_files=(TAPS_FOLDER,))


def trained_preprocessing(model: str, tuner: str) -> dict:
    """The resolution, normalisation and crop protocol a classify tuner was trained with (its config; the model's own
    and a direct resize otherwise)."""
    from restune_sd.io import read_tuner_config

    meta = read_tuner_config(tuner)
    if "head" not in meta:
        raise UserError(f"{tuner} is a tuner without a classification head (a Stable Diffusion tuner?): pass a classify run")
    mean, std = normalisation(model)
    return {"resolution": meta.get("resolution") or model_resolution(model),
            "image_mean": tuple(meta.get("image_mean") or mean), "image_std": tuple(meta.get("image_std") or std),
            "resize_crop": bool(meta.get("resize_crop", False))}


def require_batch_size(batch_size) -> int:
    return require_number("--batch-size", batch_size, minimum=1, maximum=MAX_BATCH_SIZE, integer=True)


def shown(names: list[str]) -> str:
    """Class names for a one-line message: the first few, each cut short, and how many there are in all."""
    cut = [name if len(name) <= 40 else name[:37] + "..." for name in names[:SHOWN_CLASSES]]
    return ", ".join(cut) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_CLASSES else "")


def class_mismatch(trained: list[str], classes: list[str], data: str = "the data") -> str | None:
    """How a head's classes (in label order) differ from a data set's, in words; None when names and order agree."""
    trained, classes = list(trained), list(classes)
    if trained == classes:
        return None
    if sorted(trained) == sorted(classes):
        label = next(i for i, (a, b) in enumerate(zip(trained, classes)) if a != b)
        return (f"the classes of {data} in another order (label {label} is {trained[label]!r} for the tuner, "
                f"{classes[label]!r} in {data})")
    return f"{len(trained)} classes ({shown(trained)}), {data} has {len(classes)} ({shown(classes)})"


def score_tuner(model: str, tuner: str, data: str, split: str, batch_size: int) -> dict:
    """Top-1 of a trained tuner on a split of `data`; a head trained for other classes (names, order or VTAB-1K task)
    is refused."""
    from restune_sd.datasets import build_classification_dataset, vtab_task
    from restune_sd.io import load_tuner, read_tuner_config

    require_batch_size(batch_size)
    prep = trained_preprocessing(model, tuner)
    vit = load_tuner(frozen_vit(model), tuner).eval()
    dataset = build_classification_dataset(data, split=split, resolution=prep["resolution"], mean=prep["image_mean"],
                                           std=prep["image_std"], crop=prep["resize_crop"])
    trained = [str(vit.config.id2label.get(label)) for label in range(vit.config.num_labels)]
    mismatch = class_mismatch(trained, dataset.classes, data)
    prefix, _, root = str(read_tuner_config(tuner).get("data") or "").partition(":")
    task = vtab_task(Path(root).name) if prefix.lower() == "vtab" else None
    if mismatch is None and task and data.lower().startswith("vtab:") and task != dataset.task:
        mismatch = f"VTAB-1K task {task}, {data} is {dataset.task}"  # VTAB tasks share generic names: class_0, ...
    if mismatch:
        raise UserError(f"tuner {tuner} was trained for {mismatch}: score it on the data it was trained for")
    return {"tuner": str(tuner), "data": data, "split": split, "images": len(dataset),
            "top1": top1(vit, dataset, batch_size, "cpu")}


def image_files(paths: list[Path]) -> list[Path]:
    """The images named, with each folder's images in sorted order; none at all is a UserError."""
    from restune_sd.datasets.finegrained import IMAGE_SUFFIXES

    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist: pass image files or folders of images")
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}: pass image files or folders")
    return files


def task_names(tuners: list[str]) -> dict[str, str]:
    """Each tuner's task name: its folder's name (a run directory's, for a run's tuner/); names must differ."""
    from restune_sd.io import find_tuner_dir

    names = {}
    for tuner in tuners:
        folder = find_tuner_dir(tuner)
        name = folder.parent.name if folder.name == "tuner" else folder.name
        if name in names:
            raise UserError(f"two tuners are named {name!r} ({names[name]} and {tuner}): give each task its own folder name")
        names[name] = tuner
    return names


def predictions(model: str, tuners: list[str], paths: list[Path], top_k: int, batch_size: int, notice=print):
    """One dict per image and task: the predicted label, its class name and the top-k scores. Bypass tuners share one
    backbone forward per batch; others run alone (`notice` says so once)."""
    from restune_sd.datasets import ClassificationTransform
    from restune_sd.datasets.image_files import DECODE_ERRORS, decode_rgb
    from restune_sd.multitask import MultiTask

    require_number("--top-k", top_k, minimum=1, integer=True)
    require_batch_size(batch_size)
    files = image_files(paths)
    names = task_names(tuners)
    preps = [trained_preprocessing(model, tuner) for tuner in tuners]
    if any(prep != preps[0] for prep in preps):
        raise UserError("these tuners were trained at different resolutions, normalisations or crops: predict with each "
                        "separately")
    transform = ClassificationTransform(preps[0]["resolution"], preps[0]["image_mean"], preps[0]["image_std"],
                                        crop=preps[0]["resize_crop"])
    multi = MultiTask(frozen_vit(model), names)
    if multi.separate:
        notice(f"note: {len(multi.separate)} of {len(multi.tasks)} tuners are not bypass tuners "
               f"({', '.join(t.name for t in multi.separate)}): each runs its own backbone pass")
    unreadable = []
    for start in range(0, len(files), batch_size):
        batch, pixels = [], []
        for path in files[start:start + batch_size]:
            try:
                pixels.append(transform(decode_rgb(path)))  # upright, as its EXIF tag says
                batch.append(path)
            except DECODE_ERRORS:
                unreadable.append(path)
        if not batch:
            continue
        logits = multi(torch.stack(pixels))
        for i, path in enumerate(batch):
            for task in multi.tasks:
                scores = logits[task.name][i].float().softmax(-1)
                best = scores.topk(min(top_k, scores.numel()))
                yield {"image": str(path), "task": task.name, "label": int(best.indices[0]),
                       "class": task.id2label[int(best.indices[0])],
                       "top_k": [{"label": int(j), "class": task.id2label[int(j)], "score": round(float(p), 6)}
                                 for p, j in zip(best.values, best.indices)]}
    if unreadable and len(unreadable) == len(files):
        raise UserError(f"none of the {len(files)} image(s) could be read as an image (first: {unreadable[0]}): pass "
                        "PNG, JPEG or WebP files, or folders of them")
    if unreadable:
        notice(f"warning: skipped {len(unreadable)} unreadable image(s) (first: {unreadable[0]})")
