"""Chunked HDF5 IterableDataset: chunks -> shards (rank x worker) -> ready batches, with state.

Reading single jets at random is far too slow for HDF5, so jets are read in contiguous chunks of
``chunk_batches`` batches ("weak shuffling"). For each epoch, derived from ``(seed, epoch)``:

1. the order of the chunks is permuted and, inside each chunk, the order of the jets, so each
   batch is a random draw from its chunk;
2. the resulting batch sequence is cut into equal contiguous parts, one per DDP rank (every rank
   gets exactly the same number of batches, since unequal counts hang DDP);
3. a rank's part is cut into one contiguous part per DataLoader worker and interleaved, so that
   worker ``w`` serves positions ``w, w + W, w + 2W, ...`` of the rank's sequence. PyTorch's
   DataLoader takes batches from its workers round-robin, so the main process sees exactly the
   rank's sequence, while each worker still reads contiguous chunks.

Because a rank's sequence is fixed in advance, the data position is a single number: batches
consumed in the current epoch. Resuming from it continues at the next unseen batch.
"""

from __future__ import annotations

import functools
import glob
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from salt.data.ftag import (
    Chunk,
    DataError,
    FTAGReader,
    LabelsConfig,
    ObjectOptions,
    load_yaml_dict,
)
from salt.data.workers import die_with_parent

Batch = dict[str, Any]


def expand_files(files: str | Path | Sequence[str | Path]) -> list[Path]:
    """A path, a glob or a list of either -> the list of existing files, in a stable order."""
    items = [files] if isinstance(files, str | Path) else list(files)
    out: list[Path] = []
    for item in items:
        text = str(item)
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise DataError(f"{text}: the pattern matches no file.")
            out.extend(Path(m) for m in matches)
        else:
            out.append(Path(text))
    if not out:
        raise DataError("no input files given.")
    return out


@dataclass(frozen=True)
class WorkerDataError:
    """A :class:`DataError` raised in a DataLoader worker, sent to the main process as an item.

    Torch re-raises a worker's exception with the worker's whole traceback pasted into the
    message; sent as an item, it becomes the same one-line DataError as without workers
    (:class:`BatchLoader` raises it). ``traceback`` is kept for ``debug=true``.
    """

    message: str
    traceback: str


@dataclass(frozen=True)
class _ChunkRef:
    file: int
    start: int
    stop: int
    num_batches: int


class H5BatchDataset(IterableDataset):
    """Yields ready batches (see :mod:`salt.data`) from one or more FTAG files."""

    def __init__(
        self,
        files: str | Path | Sequence[str | Path],
        *,
        variables: Mapping[str, Sequence[str]],
        norm_dict: str | Path | Mapping,
        labels: LabelsConfig | None = None,
        batch_size: int = 1000,
        num_jets: int = -1,
        num_jets_key: str = "num_jets",
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 42,
        chunk_batches: int = 10,
        trim_tracks: bool = True,
        nan_policy: str = "error",
        input_map: Mapping[str, str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        options: ObjectOptions | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or chunk_batches < 1:
            raise DataError(
                f"batch_size ({batch_size}) and chunk_batches ({chunk_batches}) must be >= 1."
            )
        if not isinstance(norm_dict, Mapping):
            norm_dict = load_yaml_dict(norm_dict, "norm_dict")
        self.files = expand_files(files)
        self.readers = [
            FTAGReader(f, variables, norm_dict, labels, input_map, nan_policy, trim_tracks, options)
            for f in self.files
        ]
        # data.noise augments training batches only, drawn from (seed, epoch, chunk, batch)
        self.noise = bool(options and options.noise) and shuffle
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.trim_tracks = trim_tracks
        self.rank, self.world_size = rank, world_size
        self.jets_per_file = self._limit(num_jets, num_jets_key)
        self.chunks = self._make_chunks(chunk_batches)
        total = sum(c.num_batches for c in self.chunks)
        self.batches_per_rank = total // world_size if drop_last else -(-total // world_size)
        if drop_last and self.batches_per_rank == 0:
            raise DataError(
                f"{self.files[0]}: {self.num_jets} jets give no full batch of {batch_size} "
                f"for each of {world_size} rank(s)."
            )
        # epoch and start position, shared with (persistent) worker processes
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.num_workers = 0

    @property
    def num_jets(self) -> int:
        return sum(self.jets_per_file)

    def _limit(self, num_jets: int, key: str) -> list[int]:
        available = [r.num_jets for r in self.readers]
        if num_jets < 0:
            return available
        if num_jets > sum(available):
            names = ", ".join(str(f) for f in self.files)
            raise DataError(
                f"{names}: {key}={num_jets} asks for more jets than the file(s) hold "
                f"({sum(available)}); expected at most {sum(available)}, or -1 for all jets."
            )
        out, left = [], num_jets
        for n in available:
            out.append(min(n, left))
            left -= out[-1]
        return out

    def _make_chunks(self, chunk_batches: int) -> list[_ChunkRef]:
        chunks = []
        bs = self.batch_size
        for i, n in enumerate(self.jets_per_file):
            # batches never span files; a file's remainder forms a last, smaller batch or is
            # dropped (drop_last), so every training batch has exactly batch_size jets
            n_batches = n // bs if self.drop_last else -(-n // bs)
            for b in range(0, n_batches, chunk_batches):
                nb = min(chunk_batches, n_batches - b)
                chunks.append(_ChunkRef(i, b * bs, min((b + nb) * bs, n), nb))
        return chunks

    # ---- the order of batches -------------------------------------------------------------
    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and the first batch (of this rank) to yield."""
        self._position[0] = epoch
        self._position[1] = start

    def __len__(self) -> int:
        return self.batches_per_rank

    def _epoch_batches(self, epoch: int) -> list[tuple[int, int]]:
        """All (chunk, batch-in-chunk) pairs of the epoch, in their global order."""
        order = np.arange(len(self.chunks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return [(int(c), i) for c in order for i in range(self.chunks[c].num_batches)]

    def rank_sequence(self, epoch: int, num_workers: int) -> list[tuple[int, int]]:
        """This rank's batches in the order the main process receives them."""
        batches = self._epoch_batches(epoch)
        n = self.batches_per_rank
        if self.drop_last:
            mine = batches[self.rank * n : (self.rank + 1) * n]
        else:
            mine = [list(p) for p in np.array_split(np.arange(len(batches)), self.world_size)][
                self.rank
            ]
            mine = [batches[i] for i in mine]
        workers = max(num_workers, 1)
        parts = np.array_split(np.arange(len(mine)), workers)
        # interleave: position k of worker w's part goes to k * workers + w
        seq: list[tuple[int, int]] = []
        for k in range(len(parts[0]) if parts else 0):
            seq.extend(mine[p[k]] for p in parts if k < len(p))
        return seq

    def __iter__(self) -> Iterator[Batch | WorkerDataError]:
        if get_worker_info() is None:
            yield from self._batches()
            return
        try:
            yield from self._batches()
        except DataError as err:
            # a worker's last item: the main process raises it (see WorkerDataError)
            yield WorkerDataError(str(err), traceback.format_exc())

    def _batches(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = (int(v) for v in self._position)
        seq = self.rank_sequence(epoch, workers if info else self.num_workers)
        cached: tuple[int, Chunk, np.ndarray] | None = None
        for pos in range(start + worker, len(seq), workers):
            chunk_id, index = seq[pos]
            if cached is None or cached[0] != chunk_id:
                cached = (chunk_id, *self._load_chunk(chunk_id, epoch))
            _, chunk, perm = cached
            # sorted rows: the same jets, gathered in memory order (faster)
            rows = np.sort(perm[index * self.batch_size : (index + 1) * self.batch_size])
            # the batch's own stream: the same noise after a resume, on any worker count
            rng = np.random.default_rng([self.seed, epoch, chunk_id, index]) if self.noise else None
            yield self._batch(self.chunks[chunk_id].file, chunk, rows, rng)

    def _load_chunk(self, chunk_id: int, epoch: int) -> tuple[Chunk, np.ndarray]:
        ref = self.chunks[chunk_id]
        chunk = self.readers[ref.file].read(ref.start, ref.stop)
        n = ref.stop - ref.start
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, chunk_id]).permutation(n)
        else:
            perm = np.arange(n)
        return chunk, perm

    def _batch(
        self, file: int, chunk: Chunk, rows: np.ndarray, rng: np.random.Generator | None = None
    ) -> Batch:
        if not self.shuffle:
            rows = slice(int(rows[0]), int(rows[-1]) + 1)  # contiguous: a view, no gather
        # each object dataset cut to the batch's longest jet in it (real objects come first)
        widths = None
        if self.trim_tracks:
            widths = {k: max(int(n[rows].max(initial=0)), 1) for k, n in chunk.num_real.items()}
        inputs, masks, labels = self.readers[file].batch(chunk, rows, widths, rng)
        return {
            "inputs": {k: torch.from_numpy(v) for k, v in inputs.items()},
            "pad_masks": {k: torch.from_numpy(v) for k, v in masks.items()},
            "labels": {
                t: {k: torch.from_numpy(v) for k, v in group.items()} for t, group in labels.items()
            },
        }


class BatchLoader:
    """A DataLoader over :class:`H5BatchDataset` that knows its position for checkpoints.

    ``state_dict()`` holds the epoch and how many batches of it were consumed;
    ``load_state_dict()`` makes the next iteration start at the next unseen batch.
    """

    def __init__(
        self,
        dataset: H5BatchDataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        self.dataset = dataset
        dataset.num_workers = num_workers
        self.epoch = 0
        self.consumed = 0
        self._resume_from = 0
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        # Our own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run would see different dropout than an uninterrupted one. The order of batches does
        # not depend on it (see H5BatchDataset).
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(0),
            # no worker outlives this process, even one killed by SIGKILL
            worker_init_fn=functools.partial(die_with_parent, os.getpid()),
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._resume_from, self.consumed = epoch, 0, 0

    def __iter__(self) -> Iterator[Batch]:
        self.consumed = self._resume_from
        self._resume_from = 0
        self.dataset.set_epoch(self.epoch, self.consumed)
        for batch in self.loader:
            if isinstance(batch, WorkerDataError):
                err = DataError(batch.message)
                err.add_note(f"In a DataLoader worker:\n{batch.traceback}")  # for debug=true
                raise err
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = self._resume_from = int(state["consumed"])
