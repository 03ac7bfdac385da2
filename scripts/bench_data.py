"""Data-loading throughput: raw h5py read vs the salt loader (0 and 2 workers).

    python scripts/bench_data.py FILE [--norm-dict PATH] [--batch-size 1000] [--num-jets N]

The raw figure reads exactly the fields the loader needs (inputs, labels, valid) from ``jets``
and ``tracks`` in contiguous blocks, in their stored types, with nothing else done: the read limit.
HDF5 reads whole records faster than a subset of their fields, so the loader does that; the
second raw line shows that figure too.
The loader figures include normalisation, masks, label maps, shuffling and batching.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np

from salt.data.dataset import BatchLoader, H5BatchDataset
from salt.data.sample import JET_VARIABLES, TRACK_VARIABLES

LABELS = {
    "jets": {"flavour_label": None},
    "tracks": {"ftagTruthOriginLabel": None, "ftagTruthVertexIndex": None},
}
VARIABLES = {"jets": list(JET_VARIABLES), "tracks": list(TRACK_VARIABLES)}


def raw_read(path: Path, num_jets: int, block: int, whole_records: bool = False) -> float:
    fields = {
        "jets": VARIABLES["jets"] + list(LABELS["jets"]),
        "tracks": VARIABLES["tracks"] + list(LABELS["tracks"]) + ["valid"],
    }
    start = time.perf_counter()
    with h5py.File(path) as f:
        for name, names in fields.items():
            ds = f[name]
            dtype = ds.dtype if whole_records else np.dtype([(n, ds.dtype[n]) for n in names])
            buf = np.empty((block, *ds.shape[1:]), dtype=dtype)
            for a in range(0, num_jets, block):
                b = min(a + block, num_jets)
                ds.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])
    return num_jets / (time.perf_counter() - start)


def loader_read(args: argparse.Namespace, num_workers: int) -> float:
    ds = H5BatchDataset(
        args.file,
        variables=VARIABLES,
        norm_dict=args.norm_dict,
        labels=LABELS,
        batch_size=args.batch_size,
        num_jets=args.num_jets,
        chunk_batches=args.chunk_batches,
    )
    loader = BatchLoader(ds, num_workers=num_workers)
    start = time.perf_counter()
    n = sum(len(batch["inputs"]["jets"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--norm-dict", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--chunk-batches", type=int, default=10)
    parser.add_argument("--num-jets", type=int, default=-1)
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs")
    args = parser.parse_args()
    args.norm_dict = args.norm_dict or args.file.parent / "norm_dict.yaml"
    with h5py.File(args.file) as f:
        total = len(f["jets"])
    args.num_jets = total if args.num_jets < 0 else min(args.num_jets, total)
    block = args.batch_size * args.chunk_batches

    raw = max(raw_read(args.file, args.num_jets, block) for _ in range(args.repeat))
    whole = max(raw_read(args.file, args.num_jets, block, True) for _ in range(args.repeat))
    print(f"raw h5py read (needed fields):  {raw:10.0f} jets/s")
    print(f"raw h5py read (whole records):  {whole:10.0f} jets/s  (what the loader reads)")
    for workers in (0, 2):
        rate = max(loader_read(args, workers) for _ in range(args.repeat))
        print(f"loader, {workers} workers:            {rate:10.0f} jets/s  ({rate / raw:.2f}x raw)")


if __name__ == "__main__":
    main()
