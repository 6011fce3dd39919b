"""Training data sources for restune-sd: COCO2017 captions, fine-grained class sets, class folders, captioned folders,
kohya folders and local Hugging Face datasets, each read from its distributor's layout and named by a `PREFIX:ROOT`
spec; aspect-ratio buckets in buckets.py."""

from restune_sd.datasets.build import LAYOUTS, build_dataset
from restune_sd.datasets.caption_dataset import CaptionDataset
from restune_sd.datasets.coco import coco_val_items
from restune_sd.datasets.synthetic import make_synthetic
from restune_sd.datasets.transforms import resize_center_crop

__all__ = ["LAYOUTS", "CaptionDataset", "build_dataset", "coco_val_items", "make_synthetic", "resize_center_crop"]

from restune_sd.datasets.classification import (  # noqa: E402 (classify's labelled data)
    CLASSIFICATION_LAYOUTS, VTAB_ALIASES, VTAB_GROUPS, VTAB_TASKS, ClassificationDataset, ClassificationTransform,
    build_classification_dataset, vtab_task,
)
from restune_sd.datasets.synthetic_classification import make_synthetic_classification  # noqa: E402

__all__ += [
    "CLASSIFICATION_LAYOUTS", "VTAB_ALIASES", "VTAB_GROUPS", "VTAB_TASKS", "ClassificationDataset",
    "ClassificationTransform", "build_classification_dataset", "make_synthetic_classification", "vtab_task",
]
