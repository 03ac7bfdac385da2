"""Training throughput of the real loop's step: jets/s, peak memory, ms per step by phase.

    python scripts/bench_train.py [--steps 20] [--warmup 3] [hydra overrides ...]
    python scripts/bench_train.py --compare [--repeat 3] [--variants a,b] [--steps 5] [...]
    python scripts/bench_train.py --matrix [--backends packed,varlen,padded] [...] [--json F]
    python scripts/bench_train.py --models GN2,GN3 [--repeat 3] [--steps 10] [...]

e.g. ``python scripts/bench_train.py model=GN2 data.batch_size=1000 trainer.precision=bf16``.
The data come from the configured files (default: the built-in sample). jets/s is timed over
the steps as training runs them (no sync inside a step); then the same number of steps is run
again with a sync after each phase for the breakdown: data wait (time blocked on the next
batch), forward (incl. losses), backward, optimizer. The first `--warmup` steps (compilation
with ``trainer.compile=true``) are not timed; their wall time is reported as `warmup_s`.

``--compare`` runs the variants below, each in a fresh process (so the peak memory is that
variant's), ``--repeat`` times interleaved, and prints the median of each figure per variant.
The fp32 variants are cumulative: `plain` is the model without the CPU optimisations (every
track slot computed, torch's dropout), each next line adds one optimisation; the bf16 pair
compares `plain` with the default model under bf16 autocast (``trainer.precision=bf16``).
``--matrix`` measures every attention backend of ``--backends``, eager and compiled.
``--models`` measures each model config (``model=<name>``, its default layout) side by side,
e.g. the GN3-style model (tracks, flows and electrons) beside GN2.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from salt.models.dropout import Dropout
from salt.training.distributed import DistInfo
from salt.training.loop import autocast, forward, optimizer_step, setup, train_step

CONF = Path(__file__).resolve().parents[1] / "conf"
PHASES = ("data", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class Variant:
    """One model/optimizer set-up to measure."""

    backend: str = "packed"  # Tagger.backend (model.attention.backend)
    cpu_dropout: bool = True  # salt's Dropout (cheaper CPU mask) instead of nn.Dropout
    foreach: bool = False  # AdamW(foreach=True) instead of the loop's (fused) optimizer
    precision: str | None = None  # trainer.precision override (None: the config's)
    compile: bool | str = False  # trainer.compile: false, true or a torch.compile backend

    def overrides(self) -> list[str]:
        out = [f"model.attention.backend={self.backend}", f"trainer.compile={self.compile}"]
        return out + ([f"trainer.precision={self.precision}"] if self.precision else [])


VARIANTS = {
    "plain": Variant(backend="padded", cpu_dropout=False),
    "+packed": Variant(cpu_dropout=False),
    "+cpu_dropout": Variant(),  # the default model on CPU
    "foreach_adamw": Variant(foreach=True),
    "plain_bf16": Variant(backend="padded", cpu_dropout=False, precision="bf16"),
    "default_bf16": Variant(precision="bf16"),
}


def matrix_variants(backends: list[str]) -> dict[str, Variant]:
    """Every backend, eager and compiled."""
    return {
        f"{b}{'+compile' if c else ''}": Variant(backend=b, compile=c)
        for b in backends
        for c in (False, True)
    }


def apply_variant(run, variant: Variant) -> None:
    """Set the tagger and optimizer of `run` up as `variant` says (beyond its overrides)."""
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


def batches(run) -> Iterator:
    """The run's device batches, epoch after epoch."""
    epoch = 0
    while True:
        run.train_batches.set_epoch(epoch)
        yield from run.train_batches
        epoch += 1


def timed_steps(run, source: Iterator, steps: int, phases: bool) -> tuple[dict, int, float]:
    """Run `steps` real training steps; (seconds per phase, jets, wall seconds).

    Without `phases`, nothing syncs inside a step (as training runs) and everything is
    booked as one total; with, the device is synced after each phase.
    """
    cuda = run.dist.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = dict.fromkeys(PHASES, 0.0)
    jets = 0
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(source)
        if not phases:
            result = train_step(run, batch)
            run.losses.add(result.losses, 0, 0, grad_norm=result.grad_norm)
            jets += batch.num_jets
            continue
        sync()
        t1 = time.perf_counter()
        _, losses = forward(run, batch.tensors, batch.jets_per_size)
        sync()
        t2 = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(losses["loss"]).backward()
        sync()
        t3 = time.perf_counter()
        optimizer_step(run, losses["loss"])
        run.scheduler.step()
        sync()
        t4 = time.perf_counter()
        for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[k] += dt
        jets += batch.num_jets
    run.losses.read()  # also: a non-finite loss fails the benchmark
    sync()
    return times, jets, time.perf_counter() - start


def measure(steps: int, warmup: int, overrides: list[str], variant: Variant | None) -> dict:
    """`warmup` untimed steps, `steps` timed as training runs, `steps` with phase syncs."""
    if variant is not None:
        overrides = [*overrides, *variant.overrides()]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "force=true",
                "logger=none",
                "trainer.progress_bar=false",
                f"trainer.fast_dev_run={warmup + 2 * steps}",  # the one-cycle's length
                *overrides,
            ],
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = setup(cfg, DistInfo(0, 0, 1, device, True, "gloo"))
    if variant is not None:
        apply_variant(run, variant)
    run.model.train()
    source = batches(run)
    t0 = time.perf_counter()
    timed_steps(run, source, warmup, phases=False)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, jets, wall = timed_steps(run, source, steps, phases=False)
    times, _, _ = timed_steps(run, source, steps, phases=True)
    total = sum(times.values())
    with autocast(device, run.autocast_dtype):
        layout = run.tagger.layout(device)
    return {
        "model": cfg.model.name,
        "batch": int(cfg.data.batch_size),
        "precision": str(cfg.trainer.precision),
        "layout": layout,
        "compile": cfg.trainer.compile,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "jets_per_s": jets / wall,
        "warmup_s": warmup_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "peak_gpu_gb": (
            torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
        ),
        **{f"{k}_ms": 1000 * v / steps for k, v in times.items()},
        "data_wait_pct": 100 * times["data"] / total,
    }


def print_result(r: dict) -> None:
    print(
        f"model {r['model']}  batch {r['batch']}  precision {r['precision']}"
        f"  threads {r['threads']}  device {r['device']}"
    )
    gpu = f"   peak GPU {r['peak_gpu_gb']:.2f} GB" if r["peak_gpu_gb"] is not None else ""
    print(
        f"training: {r['jets_per_s']:8.1f} jets/s   peak RSS {r['peak_rss_gb']:.2f} GB{gpu}"
        f"   ({r['layout']} layout{', compiled' if r['compile'] else ''}, warm-up "
        f"{r['warmup_s']:.1f} s)"
    )
    print(
        "ms/step: "
        + "  ".join(f"{k} {r[f'{k}_ms']:.1f}" for k in PHASES)
        + f"  (data wait {r['data_wait_pct']:.1f}%)"
    )


def variant_named(name: str, compile_backend: str = "inductor") -> Variant:
    """A variant of VARIANTS, or `<backend>[+compile]` (the --matrix names)."""
    if name in VARIANTS:
        return VARIANTS[name]
    backend, _, rest = name.partition("+")
    if backend not in ("auto", "packed", "varlen", "padded") or rest not in ("", "compile"):
        raise SystemExit(
            f"unknown variant {name!r}; choose from {list(VARIANTS)} or <backend>[+compile]"
        )
    compiled = (compile_backend if compile_backend != "inductor" else True) if rest else False
    return Variant(backend=backend, compile=compiled)


def run_variant(name: str, args: argparse.Namespace, overrides: list[str]) -> dict:
    """One measurement in a fresh process; a failure (an OOM, a compile error, a timeout) is
    reported in the result, so one variant cannot take the others down."""
    cmd = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--compile-backend", args.compile_backend, *overrides]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=args.variant_timeout
        )
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"timed out after {args.variant_timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"variant": name, "error": f"exit {proc.returncode}: {tail}"}
    return {"variant": name, **json.loads(lines[-1])}


def compare(args: argparse.Namespace, overrides: list[str], names: list[str]) -> list[dict]:
    """Each variant in its own process, `repeat` rounds interleaved; medians per variant."""
    for name in names:
        variant_named(name, args.compile_backend)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.repeat):
        for name in names:
            results[name].append(run_variant(name, args, overrides))
    ok = [rs[0] for rs in results.values() if "error" not in rs[0]]
    first = ok[0] if ok else {"model": "?", "batch": "?", "threads": "?", "device": "?"}
    print(
        f"model {first['model']}  batch {first['batch']}  threads {first['threads']}  device "
        f"{first['device']}  steps {args.steps} (+{args.warmup} warm-up)  medians of "
        f"{args.repeat} run(s)"
    )
    print(
        f"{'variant':16s} {'precision':>9s} {'layout':>7s} {'jets/s':>9s} {'warm-up s':>9s} "
        f"{'RSS GB':>7s} {'GPU GB':>7s}  " + " ".join(f"{k + ' ms':>12s}" for k in PHASES)
    )
    summary = []
    for name in names:
        rs = [r for r in results[name] if "error" not in r]
        if not rs:
            print(f"{name:16s} failed: {results[name][0]['error']}")
            summary.append(results[name][0])
            continue

        def med(key: str, rs: list[dict] = rs) -> float | None:
            values = [r[key] for r in rs if r[key] is not None]
            return statistics.median(values) if values else None

        row = {**rs[0], **{k: med(k) for k in rs[0] if isinstance(rs[0][k], float)}}
        summary.append(row)
        gpu = f"{row['peak_gpu_gb']:7.2f}" if row["peak_gpu_gb"] is not None else f"{'-':>7s}"
        print(
            f"{name:16s} {row['precision']:>9s} {row['layout']:>7s} {row['jets_per_s']:9.1f} "
            f"{row['warmup_s']:9.1f} {row['peak_rss_gb']:7.2f} {gpu}  "
            + " ".join(f"{row[f'{k}_ms']:12.1f}" for k in PHASES)
        )
    return summary


def compare_models(args: argparse.Namespace, overrides: list[str], models: list[str]) -> list:
    """Each model config in its own process (`repeat` rounds interleaved); medians."""
    results: dict[str, list[dict]] = {m: [] for m in models}
    for _ in range(args.repeat):
        for m in models:
            results[m].append(run_variant("auto", args, [*overrides, f"model={m}"]))
    print(f"steps {args.steps} (+{args.warmup} warm-up), medians of {args.repeat} run(s)")
    print(
        f"{'model':8s} {'batch':>6s} {'precision':>9s} {'layout':>7s} {'jets/s':>9s} "
        f"{'RSS GB':>7s} {'GPU GB':>7s} {'device':>10s}"
    )
    summary = []
    for m in models:
        rs = [r for r in results[m] if "error" not in r]
        if not rs:
            print(f"{m:8s} failed: {results[m][0]['error']}")
            summary.append({"model": m, **results[m][0]})
            continue
        row = {**rs[0], "jets_per_s": statistics.median(r["jets_per_s"] for r in rs)}
        summary.append(row)
        gpu = f"{row['peak_gpu_gb']:7.2f}" if row["peak_gpu_gb"] is not None else f"{'-':>7s}"
        print(
            f"{m:8s} {row['batch']:>6} {row['precision']:>9s} {row['layout']:>7s} "
            f"{row['jets_per_s']:9.1f} {row['peak_rss_gb']:7.2f} {gpu} {row['device']:>10s}"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="measure every variant")
    parser.add_argument("--matrix", action="store_true", help="every backend, eager and compiled")
    parser.add_argument("--backends", default="packed,varlen,padded", help="--matrix backends")
    parser.add_argument("--repeat", type=int, default=1, help="rounds per variant")
    parser.add_argument("--variants", help=f"--compare: comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--variant-timeout", type=float, default=None, help="seconds per variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of +compile variants"
    )
    parser.add_argument("--models", help="comma-separated model configs to measure side by side")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.models:
        results = compare_models(args, overrides, args.models.split(","))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    elif args.compare or args.matrix:
        if args.matrix:
            names = list(matrix_variants(args.backends.split(",")))
        else:
            names = args.variants.split(",") if args.variants else list(VARIANTS)
        results = compare(args, overrides, names)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    elif args.variant:  # one --compare measurement, as a JSON line
        variant = variant_named(args.variant, args.compile_backend)
        print(json.dumps(measure(args.steps, args.warmup, overrides, variant)))
    else:
        result = measure(args.steps, args.warmup, overrides, None)
        print_result(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
