"""Shuffled minibatches whose order survives a restart mid-epoch (exact resume).

Lightning restores the data position of a *stateful* training DataLoader (one with
``state_dict``/``load_state_dict``) when a fit resumes from a checkpoint saved mid-epoch; a plain
DataLoader restarts the epoch from its first batch with a new shuffle. Here the order of epoch
``e`` is a pure function of ``(seed, e)`` (``EpochShuffleSampler``; Lightning calls
``set_epoch`` at every epoch start), and ``ResumableDataLoader`` saves how many batches of the
epoch it has handed out, so a resumed run trains on exactly the batches the interrupted one would
have: with plain SGD the final weights are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

EPOCH_STRIDE = 1_000_003  # a prime: seeds (seed, epoch) and (seed', epoch') rarely collide


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(size)`` drawn from ``(seed, epoch)``, optionally from a start.

    The epoch advances by itself after a complete pass (so re-iterating gives the next epoch's
    order, as in a Trainer), and ``set_epoch`` sets it explicitly.

    Args:
        size: number of examples.
        seed: seed of the shuffling.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` at the next pass (Lightning calls this every epoch)."""
        self.epoch = epoch

    def permutation(self, epoch: int) -> list[int]:
        """The order of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.permutation(self.epoch)[start:]
        self.epoch += 1


class ResumableDataLoader(DataLoader):
    """A DataLoader over an ``EpochShuffleSampler`` that saves its position in the epoch.

    ``state_dict`` gives ``{"epoch", "batches"}``, the batches handed out in the current pass;
    Lightning stores it in checkpoints and ``load_state_dict`` makes the next pass of that epoch
    skip them. The sampler must be an ``EpochShuffleSampler`` and every batch but the last
    ``batch_size`` long (the default ``drop_last=False`` sampler batching).
    """

    sampler: EpochShuffleSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler):  # e.g. replaced by a distributed sampler
            yield from super().__iter__()
            return
        skip = 0
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            skip = self._resume["batches"]
        self._resume = None
        assert self.batch_size is not None
        sampler.start = skip * self.batch_size
        self._epoch, self._batches = sampler.epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch of the current pass and how many of its batches were handed out."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next pass of epoch ``state_dict["epoch"]`` skip its first ``batches``."""
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
