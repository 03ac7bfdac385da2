"""How often a two-rank gloo run aborts on exit, with and without the wait in `cleanup`.

    python scripts/check_rank_exit.py [--runs 60] [--drain-s 0.2]

Each run spawns two CPU ranks (salt's `spawn`), takes a few optimizer steps, ends with two
collectives and exits through `cleanup`. ``--drain-s 0`` is the behaviour before the fix: a rank
then sometimes ends with SIGABRT ("terminate called without an active exception") because a gloo
worker thread still frees the last collective's tensors while the interpreter shuts down.
Exits with 1 if any run aborted.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from salt.training import distributed


def _rank(rank: int, drain_s: float) -> None:
    distributed.GLOO_DRAIN_S = drain_s  # read by cleanup() when this rank exits
    distributed.init_distributed(2, "cpu")
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        model(torch.randn(32, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    distributed.all_reduce_sum(torch.ones(1))
    distributed.broadcast_object(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--drain-s", type=float, default=distributed.GLOO_DRAIN_S)
    args = parser.parse_args()
    aborted, start = 0, time.perf_counter()
    for _ in range(args.runs):
        try:
            distributed.spawn(_rank, 2, (args.drain_s,))
        except distributed.RankFailedError as err:
            aborted += 1
            print(err, flush=True)
    print(
        f"drain {args.drain_s} s: {aborted} of {args.runs} runs aborted "
        f"({time.perf_counter() - start:.0f} s)"
    )
    sys.exit(1 if aborted else 0)


if __name__ == "__main__":
    main()
