"""The seeded sample stream every training run reads: position p of an endless stream is a pure function of the
seed and p, and each optimizer step's micro-batches are slices of it, so resumed and N-process runs see the same
samples as one uninterrupted process."""

import math

import torch


def seeded(*parts: int) -> torch.Generator:
    """A generator whose seed mixes integers, for draws that must not depend on process layout or history."""
    mixed = 0x9E3779B97F4A7C15
    for part in parts:
        mixed = (mixed ^ (int(part) + 0x632BE59BD9B4E019 + (mixed << 6) + (mixed >> 2))) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(mixed)


class SampleStream(torch.utils.data.Dataset):
    """Position p of an endless stream: epoch p // N, the p % N-th item of that epoch's seeded permutation."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.epoch_size = len(dataset)  # stream positions per epoch
        self._perms = {}

    def locate(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=seeded(self.seed, epoch))}
        return epoch, int(self._perms[epoch][offset])

    def __len__(self):
        return 2**62

    def __getitem__(self, position: int):
        epoch, index = self.locate(position)
        self.dataset.set_epoch(epoch)
        item = dict(self.dataset[index])
        item["position"], item["index"] = position, index
        return item


class BucketStream(SampleStream):
    """The stream of a dataset with aspect-ratio `buckets`: the `group` samples of each optimizer step share a bucket.

    An epoch shuffles each bucket, cuts it into groups (the last one filled up by wrapping round the bucket, so every
    image is seen) and shuffles the groups; all seeded by (seed, epoch), so resumed and N-process runs see the same
    order. Only the current epoch's order is held.
    """

    def __init__(self, dataset, seed: int, group: int):
        super().__init__(dataset, seed)
        self.group, self.members = group, dataset.buckets.members()
        self.epoch_size = group * sum(math.ceil(len(members) / group) for members in self.members)
        self._orders = {}

    def locate(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.epoch_size)
        if epoch not in self._orders:
            self._orders = {epoch: self.order(epoch)}
        indices, start = self._orders[epoch][offset // self.group]
        return epoch, indices[(start + offset % self.group) % len(indices)]

    def order(self, epoch: int) -> list[tuple[list[int], int]]:
        """The epoch's groups in turn, each as (its bucket's indices in shuffled order, where the group starts)."""
        shuffled = [[members[i] for i in torch.randperm(len(members), generator=seeded(self.seed, epoch, b)).tolist()]
                    for b, members in enumerate(self.members)]
        groups = [(indices, start) for indices in shuffled for start in range(0, len(indices), self.group)]
        return [groups[i] for i in torch.randperm(len(groups), generator=seeded(self.seed, epoch)).tolist()]


def sample_stream(dataset, seed: int, group: int) -> SampleStream:
    """The stream of a job's data: bucketed when the dataset has `buckets`, each step's `group` samples from one."""
    return BucketStream(dataset, seed, group) if getattr(dataset, "buckets", None) else SampleStream(dataset, seed)


class StepBatches(torch.utils.data.Sampler):
    """This process's micro-batches from step `start` to `total`: slices of each global batch in stream order.

    Each step's indices are computed from the step, so nothing is built up front for the whole run.
    """

    def __init__(self, start: int, total: int, accumulation: int, global_batch: int, rank: int, batch: int):
        self.start, self.total, self.accumulation = start, total, accumulation
        self.global_batch, self.rank, self.batch = global_batch, rank, batch

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in range(self.accumulation):
                first = (step * self.accumulation + micro) * self.global_batch + self.rank * self.batch
                yield list(range(first, first + self.batch))

    def __len__(self):
        return (self.total - self.start) * self.accumulation
