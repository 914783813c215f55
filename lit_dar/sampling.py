"""The training sample order: a pure function of (seed, epoch, rank), resumable at any sample.

:class:`StepSampler` is the order; ``lit-dar`` runs read it endlessly from the restored step
(:func:`resumable_loader`), and :class:`ResumableDataLoader` (``StdlibCorpus``'s train loader, for LitGPT-style
Fabric loops) one epoch at a time with its position in ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class StepSampler(Sampler[int]):
    """The sample order of training: endless and resumable. Epoch ``e`` is ``randperm(n)`` seeded by ``seed + e``,
    dealt round-robin to ranks (the uneven tail dropped), and iteration starts after the first ``start`` samples
    of this rank.

    Because the order depends only on (seed, rank, start), a run resumed at optimizer step ``k`` starts at
    ``k · accumulate · micro_batch`` and continues exactly where the interrupted run was. ``lit-dar`` runs use
    it through :func:`resumable_loader`, and :class:`ResumableDataLoader` draws its epochs from it.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.per_rank = n // world_size
        if self.per_rank < 1:
            raise ValueError(f"The training set has {n} samples, fewer than the {world_size} ranks.")
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start

    def epoch(self, epoch: int) -> list[int]:
        """This rank's samples of one epoch, in order."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[self.rank :: self.world_size][: self.per_rank].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


class EvenShards(Sampler[int]):
    """Validation samples split into equal contiguous shards (FSDP needs the same number of steps per rank)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.size = n // world_size
        self.begin = rank * self.size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.begin + self.size))

    def __len__(self) -> int:
        return self.size


def resumable_loader(
    dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, start_step: int, accumulate: int,
    num_workers: int = 0, collate_fn: Any = None,
) -> DataLoader:
    """Batches of this rank from optimizer step ``start_step`` on (``accumulate`` micro-batches per step)."""
    start = start_step * accumulate * batch_size
    sampler = StepSampler(len(dataset), seed, rank, world_size, start)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      collate_fn=collate_fn)


class EpochShuffleSampler(DistributedSampler):
    """One epoch of :class:`StepSampler`'s order at a time, resumable mid-epoch, for :class:`ResumableDataLoader`.

    Being a ``DistributedSampler`` keeps Fabric and Lightning from swapping in their own sampler
    (which would lose the seed and the resume position). The epoch advances when the loader
    finishes a pass (`ResumableDataLoader`); outside ``set_epoch`` calls are ignored, because
    Fabric passes its count of ``iter()`` calls, which restarts from 0 after a resume.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if initialized else (1, 0)
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.order = StepSampler(len(dataset), seed, rank, world_size)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.order.epoch(self.epoch)[skip:])


class ResumableDataLoader(DataLoader):
    """The training loader: its position is checkpointable through ``state_dict``/``load_state_dict``.

    LitGPT's pretraining loop puts the train loader in the state it saves. A plain ``DataLoader``
    would be pickled whole (token tensor included, and unloadable without this package); this
    one saves ``{"epoch", "batches"}`` and, when loaded, continues with the next unseen batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> None:
        sampler = EpochShuffleSampler(dataset, seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers)
        self.batches_done = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch
        self.sampler.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch = int(state["epoch"])
        self.batches_done = int(state["batches"])
        self.sampler.skip = self.batches_done * self.batch_size


