"""Training throughput of the real loop's pieces: jets/s, peak RSS, ms per step by phase.

    python scripts/bench_train.py [--steps 20] [--warmup 3] [hydra overrides ...]
    python scripts/bench_train.py --compare [--repeat 3] [--variants a,b] [--steps 5] [...]

e.g. ``python scripts/bench_train.py model=GN2 data.batch_size=1000 trainer.precision=bf16``.
The data come from the configured files (default: the built-in sample). Phases: data wait
(time blocked on the loader), forward (incl. losses), backward, optimizer (clip + step).

``--compare`` runs the variants below, each in a fresh process (so the peak RSS is that
variant's), ``--repeat`` times interleaved, and prints the median of each figure per variant.
The fp32 variants are cumulative: `plain` is the model without the CPU optimisations (every
track slot computed, torch's dropout), each next line adds one optimisation; the bf16 pair
compares `plain` with the default model under bf16 autocast (``trainer.precision=bf16``).
Other overrides apply to every variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from salt.models.dropout import Dropout
from salt.training.distributed import DistInfo
from salt.training.loop import forward, setup

CONF = Path(__file__).resolve().parents[1] / "conf"
PHASES = ("data", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class Variant:
    """One model/optimizer set-up to measure."""

    backend: str = "packed"  # Tagger.backend (model.attention.backend)
    cpu_dropout: bool = True  # salt's Dropout (cheaper CPU mask) instead of nn.Dropout
    foreach: bool = False  # AdamW(foreach=True) instead of the loop's optimizer
    precision: str | None = None  # trainer.precision override (None: the config's)


VARIANTS = {
    "plain": Variant(backend="padded", cpu_dropout=False),
    "+packed": Variant(cpu_dropout=False),
    "+cpu_dropout": Variant(),  # the default model
    "+foreach_adamw": Variant(foreach=True),
    "plain_bf16": Variant(backend="padded", cpu_dropout=False, precision="bf16"),
    "default_bf16": Variant(precision="bf16"),
}


def apply_variant(run, variant: Variant) -> None:
    """Set the tagger and optimizer of `run` up as `variant` says."""
    run.tagger.backend = variant.backend
    if not variant.cpu_dropout:
        for module in list(run.tagger.modules()):
            for name, child in module.named_children():
                if isinstance(child, Dropout):
                    setattr(module, name, nn.Dropout(child.p))
    if variant.foreach:
        group = run.optimizer.param_groups[0]
        run.optimizer = torch.optim.AdamW(
            run.tagger.parameters(),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            foreach=True,
        )


def measure(steps: int, warmup: int, overrides: list[str], variant: Variant | None) -> dict:
    """Train `warmup + steps` steps; the figures of the last `steps`."""
    if variant is not None and variant.precision is not None:
        overrides = [*overrides, f"trainer.precision={variant.precision}"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "force=true",
                "logger=none",
                "trainer.progress_bar=false",
                "trainer.fast_dev_run=1",
                *overrides,
            ],
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = setup(cfg, DistInfo(0, 0, 1, device, True, "gloo"))
    if variant is not None:
        apply_variant(run, variant)
    run.model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = dict.fromkeys(PHASES, 0.0)
    jets = 0
    loader = iter(run.train_loader)
    clip = cfg.trainer.gradient_clip_val
    for step in range(warmup + steps):
        if step == warmup:
            times = dict.fromkeys(PHASES, 0.0)
            jets = 0
        t0 = time.perf_counter()
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(run.train_loader)
            batch = next(loader)
        batch = {
            k: {
                kk: (
                    vv.to(device)
                    if torch.is_tensor(vv)
                    else {a: b.to(device) for a, b in vv.items()}
                )
                for kk, vv in v.items()
            }
            for k, v in batch.items()
        }
        sync()
        t1 = time.perf_counter()
        _, losses = forward(run, batch)
        sync()
        t2 = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(losses["loss"]).backward()
        sync()
        t3 = time.perf_counter()
        if clip:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.tagger.parameters(), float(clip), foreach=True)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        sync()
        t4 = time.perf_counter()
        for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[k] += dt
        jets += len(batch["inputs"]["jets"])
    total = sum(times.values())
    return {
        "model": cfg.model.name,
        "batch": int(cfg.data.batch_size),
        "precision": str(cfg.trainer.precision),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "jets_per_s": jets / total,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        **{f"{k}_ms": 1000 * v / steps for k, v in times.items()},
        "data_wait_pct": 100 * times["data"] / total,
    }


def print_result(r: dict) -> None:
    print(
        f"model {r['model']}  batch {r['batch']}  precision {r['precision']}"
        f"  threads {r['threads']}  device {r['device']}"
    )
    print(f"training: {r['jets_per_s']:8.1f} jets/s   peak RSS {r['peak_rss_gb']:.2f} GB")
    print(
        "ms/step: "
        + "  ".join(f"{k} {r[f'{k}_ms']:.1f}" for k in PHASES)
        + f"  (data wait {r['data_wait_pct']:.1f}%)"
    )


def compare(args: argparse.Namespace, overrides: list[str]) -> None:
    """Each variant in its own process, `repeat` rounds interleaved; medians per variant."""
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.repeat):
        for name in names:
            cmd = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), *overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"variant {name} failed ({proc.returncode}):\n{proc.stderr}")
            results[name].append(json.loads(lines[-1]))
    first = results[names[0]][0]
    print(
        f"model {first['model']}  batch {first['batch']}  threads {first['threads']}  device "
        f"{first['device']}  steps {args.steps} (+{args.warmup} warm-up)  medians of "
        f"{args.repeat} run(s)"
    )
    print(
        f"{'variant':16s} {'precision':>9s} {'jets/s':>8s} {'RSS GB':>7s}  "
        + " ".join(f"{k + ' ms':>12s}" for k in PHASES)
    )
    for name in names:
        rs = results[name]

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"{name:16s} {rs[0]['precision']:>9s} {med('jets_per_s'):8.1f} "
            f"{med('peak_rss_gb'):7.2f}  " + " ".join(f"{med(f'{k}_ms'):12.1f}" for k in PHASES)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="measure every variant")
    parser.add_argument("--repeat", type=int, default=1, help="--compare: rounds per variant")
    parser.add_argument("--variants", help=f"--compare: comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.compare:
        compare(args, overrides)
    elif args.variant:  # one --compare measurement, as a JSON line
        print(json.dumps(measure(args.steps, args.warmup, overrides, VARIANTS[args.variant])))
    else:
        print_result(measure(args.steps, args.warmup, overrides, None))


if __name__ == "__main__":
    main()
