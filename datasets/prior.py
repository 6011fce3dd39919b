"""Prior preservation's training items (DreamBooth): each instance item paired with a class image, the pairing a pure
function of (seed, epoch, index), so resumed and N-process runs pair as one uninterrupted process does."""

import torch

from restune_sd.streams import SampleStream


class PriorPairs(torch.utils.data.Dataset):
    """The instance dataset's items, each with a class image beside it: "class_pixel_values" (cropped to the instance
    item's size, so a batch and an aspect-ratio bucket stack), "class_index" and "class_flipped".

    The instance items walk along a seeded endless stream of the class images (streams.SampleStream): item `index` of
    epoch `e` takes its position e * len(instance) + index, so every class image is used once before any is used
    again. A class image's crop and flip are drawn as the instance images' are, from (seed, class epoch, index).
    """

    def __init__(self, instance, classes, seed: int):
        self.instance, self.classes = instance, classes
        self.class_stream = SampleStream(classes, seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.instance)

    @property
    def buckets(self):  # the sample stream groups each step's samples by the instance images' buckets
        return getattr(self.instance, "buckets", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.instance.set_epoch(epoch)

    def corrupt_summary(self, indices: set[int] | None = None) -> str | None:
        return self.instance.corrupt_summary(indices)

    def __getitem__(self, index: int) -> dict:
        item = self.instance[index]
        class_epoch, class_index = self.class_stream.locate(self.epoch * len(self.instance) + index)
        self.classes.set_epoch(class_epoch)
        current, image, rng = self.classes.decode_from(class_index)
        height, width = item["pixel_values"].shape[-2:]
        pixels, flipped = self.classes.transform.apply(image, rng, (width, height))
        return {**item, "class_pixel_values": pixels, "class_index": current, "class_flipped": flipped}
