"""Training throughput of the real loop's pieces: jets/s, peak RSS, ms per step by phase.

    python scripts/bench_train.py [--steps 20] [--warmup 3] [hydra overrides ...]

e.g. ``python scripts/bench_train.py model=GN2 data.batch_size=1000 trainer.precision=bf16``.
The data come from the configured files (default: the built-in sample). Phases: data wait
(time blocked on the loader), forward (incl. losses), backward, optimizer (clip + step).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from salt.training.distributed import DistInfo
from salt.training.loop import forward, setup

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args, overrides = parser.parse_known_args()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=["force=true", "logger=none", "trainer.progress_bar=false",
                                          "trainer.fast_dev_run=1", *overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = setup(cfg, DistInfo(0, 0, 1, device, True, "gloo"))
    run.model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    jets = 0
    loader = iter(run.train_loader)
    clip = cfg.trainer.gradient_clip_val
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            times = dict.fromkeys(times, 0.0)
            jets = 0
        t0 = time.perf_counter()
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(run.train_loader)
            batch = next(loader)
        batch = {k: ({kk: (vv.to(device) if torch.is_tensor(vv) else
                           {a: b.to(device) for a, b in vv.items()}) for kk, vv in v.items()})
                 for k, v in batch.items()}
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
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[k] += dt
        jets += len(batch["inputs"]["jets"])
    total = sum(times.values())
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"model {cfg.model.name}  batch {cfg.data.batch_size}  precision {cfg.trainer.precision}"
          f"  threads {torch.get_num_threads()}  device {device}")
    print(f"training: {jets / total:8.1f} jets/s   peak RSS {rss_gb:.2f} GB")
    print("ms/step: " + "  ".join(f"{k} {1000 * v / args.steps:.1f}" for k, v in times.items())
          + f"  (data wait {100 * times['data'] / total:.1f}%)")


if __name__ == "__main__":
    main()
