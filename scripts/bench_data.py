"""Data-loading throughput: raw h5py read vs the salt loader, per worker count.

    python scripts/bench_data.py FILE [FILE ...] [--workers 0,2,4,8] [--batch-size 1000]
        [--num-jets N] [--norm-dict PATH] [-- model=GN2 model.variables.tracks=[...] ...]

The variables and labels read are those of a model config (default `model=GN2`; Hydra
overrides after `--`), so any FTAG file with them works. Several files are read as one
dataset, as training reads a list or a glob.

The raw figure reads exactly the fields the loader needs (inputs, labels, valid) from the
datasets in contiguous blocks, in their stored types, with nothing else done: the read limit.
HDF5 reads whole records faster than a subset of their fields, so the loader does that; the
second raw line shows that figure too. The loader figures include normalisation, masks, label
maps, shuffling and batching; per worker is what a node with more cores multiplies.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from hydra import compose, initialize_config_dir

import salt.schema  # noqa: F401  (registers the config schemas that conf/ names)
from salt import models
from salt.data.dataset import BatchLoader, H5BatchDataset
from salt.data.ftag import DEFAULT_INPUT_MAP, VALID

CONF = Path(__file__).resolve().parents[1] / "conf"


def model_reads(overrides: list[str]) -> tuple[dict, dict]:
    """(variables, label specs) of the model config composed from `overrides`."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides)
    return models.input_variables(cfg.model), models.label_specs(cfg.model)


def dataset_fields(variables: dict, labels: dict) -> dict[str, list[str]]:
    """The fields read from each dataset of the file."""
    fields: dict[str, list[str]] = {}
    for input_type, names in [*variables.items(), *((k, list(v)) for k, v in labels.items())]:
        dataset = DEFAULT_INPUT_MAP[input_type]
        fields.setdefault(dataset, [])
        fields[dataset] += [n for n in names if n not in fields[dataset]]
    fields["tracks"] = [*fields.get("tracks", []), VALID]
    return fields


def raw_read(files: list[Path], fields: dict, num_jets: int, block: int, whole: bool) -> float:
    start, done = time.perf_counter(), 0
    for path in files:
        with h5py.File(path) as f:
            n = min(len(f["jets"]), num_jets - done)
            for name, names in fields.items():
                ds = f[name]
                dtype = ds.dtype if whole else np.dtype([(v, ds.dtype[v]) for v in names])
                buf = np.empty((block, *ds.shape[1:]), dtype=dtype)
                for a in range(0, n, block):
                    b = min(a + block, n)
                    ds.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])
            done += n
        if done >= num_jets:
            break
    return done / (time.perf_counter() - start)


def loader_read(args: argparse.Namespace, variables: dict, labels: dict, workers: int) -> float:
    ds = H5BatchDataset(
        args.files,
        variables=variables,
        norm_dict=args.norm_dict,
        labels=labels,
        batch_size=args.batch_size,
        num_jets=args.num_jets,
        chunk_batches=args.chunk_batches,
    )
    loader = BatchLoader(ds, num_workers=workers)
    start = time.perf_counter()
    n = sum(len(batch["inputs"]["jets"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--norm-dict", type=Path, default=None, help="default: beside FILE")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--chunk-batches", type=int, default=10)
    parser.add_argument("--num-jets", type=int, default=-1, help="-1: all jets of all files")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts (0,2,4,8)")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs")
    parser.epilog = "Model config overrides (Hydra) follow a --, e.g. -- model=GN1"
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    variables, labels = model_reads(["model=GN2", *overrides])
    args.norm_dict = args.norm_dict or args.files[0].parent / "norm_dict.yaml"
    total = 0
    for path in args.files:
        with h5py.File(path) as f:
            total += len(f["jets"])
    args.num_jets = total if args.num_jets < 0 else min(args.num_jets, total)
    block = args.batch_size * args.chunk_batches
    fields = dataset_fields(variables, labels)

    def best(measure) -> float:
        return max(measure() for _ in range(args.repeat))

    raw = best(lambda: raw_read(args.files, fields, args.num_jets, block, False))
    whole = best(lambda: raw_read(args.files, fields, args.num_jets, block, True))
    print(f"{args.num_jets} jets in {len(args.files)} file(s)")
    print(f"raw h5py read (needed fields):  {raw:10.0f} jets/s")
    print(f"raw h5py read (whole records):  {whole:10.0f} jets/s  (what the loader reads)")
    for workers in (int(w) for w in args.workers.split(",")):
        rate = best(lambda w=workers: loader_read(args, variables, labels, w))
        per = f", {rate / workers:8.0f} per worker" if workers else ""
        label = f"loader, {workers:2d} workers:"
        print(f"{label:<31} {rate:10.0f} jets/s  ({rate / raw:.2f}x raw{per})")


if __name__ == "__main__":
    main()
