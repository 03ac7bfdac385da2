"""Batches on their way to the device, one ahead of the step that uses them.

On a GPU the loader hands over batches in pinned host memory (``data.pin_memory: auto``);
each is copied with non-blocking copies on a side CUDA stream while the current step runs,
so the step never waits for a host-to-device copy. What the step needs to know on the host
(the number of jets, the tracks' multiplicities for the packed layouts) is read from the host
batch before the copy: nothing in a step has to come back from the device.

``state_dict()`` is the position of the batches handed to the step, not of those the loader
has produced: the batch in flight is not counted, so a resumed run trains on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from salt.data.dataset import Batch, BatchLoader
from salt.models.packing import jets_per_multiplicity
from salt.models.tagger import ALL_OBJECTS


@dataclass
class DeviceBatch:
    """A batch on the device, with what the host knows about it."""

    tensors: Batch  # inputs, pad_masks, labels: tensors on the device
    num_jets: int
    # jets per object multiplicity (see salt.models.packing): a list for one object type, by
    # type (and "objects" for their joint sequence) for several
    jets_per_size: list[int] | dict[str, list[int]] | None


def object_counts(masks: Mapping[str, Tensor]) -> list[int] | dict[str, list[int]] | None:
    """`jets_per_multiplicity` of each object type's pad mask and of their joint sequence,
    counted on the host before the batch goes to the device (the packing then needs no sync)."""
    if not masks:
        return None
    if len(masks) == 1:
        return jets_per_multiplicity(next(iter(masks.values())))
    counts = {t: jets_per_multiplicity(m) for t, m in masks.items()}
    # the joint sequence's multiplicity is the total per jet, whatever the order of the types
    counts[ALL_OBJECTS] = jets_per_multiplicity(torch.cat(list(masks.values()), dim=1))
    return counts


def _map(x: Any, fn: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _map(v, fn) for k, v in x.items()}
    return fn(x) if isinstance(x, Tensor) else x


def _tensors(x: Any) -> Iterator[Tensor]:
    if isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, Tensor):
        yield x


class DeviceBatches:
    """Iterate a `BatchLoader`'s batches on `device`, the next one copied while a step runs."""

    def __init__(self, loader: BatchLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.ahead = 0  # batches taken from the loader, not yet handed to the step

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        self.ahead = 0

    @property
    def consumed(self) -> int:
        """Batches of this epoch handed to the step (resumed ones included)."""
        return self.loader.consumed - self.ahead

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.loader.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.loader.load_state_dict(state)
        self.ahead = 0

    def __iter__(self) -> Iterator[DeviceBatch]:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        # a batch taken but never handed over (the step loop stopped early) stays counted
        # in `ahead`: the position saved after the stop is that of the last trained batch
        self.ahead = 0
        pending: DeviceBatch | None = None
        for host in self.loader:
            self.ahead += 1
            batch = self._start(host, stream)
            if pending is not None:
                self.ahead -= 1
                yield self._ready(pending, stream)
            pending = batch
        if pending is not None:
            self.ahead -= 1
            yield self._ready(pending, stream)

    def _start(self, host: Batch, stream: torch.cuda.Stream | None) -> DeviceBatch:
        """Read the host facts, then start the copy (on the side stream)."""
        inputs = host["inputs"]
        num_jets = len(next(iter(inputs.values())))
        counts = object_counts(host.get("pad_masks", {}))
        if stream is None:
            return DeviceBatch(host, num_jets, counts)
        with torch.cuda.stream(stream):
            tensors = _map(host, lambda t: t.to(self.device, non_blocking=True))
        return DeviceBatch(tensors, num_jets, counts)

    def _ready(self, batch: DeviceBatch, stream: torch.cuda.Stream | None) -> DeviceBatch:
        """Make the step's stream wait for the copy; its memory now belongs to that stream."""
        if stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            for t in _tensors(batch.tensors):
                t.record_stream(current)
        return batch
