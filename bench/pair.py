"""Two node processes making transfers, nothing else: a target for a profiler.

    py-spy record --subprocesses --format raw -o prof.txt -- \\
        .venv/bin/python bench/pair.py --count 3000 --in-flight 64

prints (transfers per second, p50, p99) when done, then the CPU time each node
process spent per transfer (docs/PERFORMANCE.md). With ``--batch N`` the
transfers go N to a batched proposal, ``--in-flight`` batches at a time; with
``--one-round`` the sender asks for one-round transfers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
from pathlib import Path

import bench  # the script's own directory is on the path


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/pair.py")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument(
        "--batch", type=int, default=0,
        help="transfers per batched proposal (--in-flight then counts batches)",
    )  # fmt: skip
    parser.add_argument(
        "--one-round", action="store_true",
        help="the sender asks for one-round transfers (docs/PROTOCOL.md §6.11)",
    )  # fmt: skip
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench.make_parties(root)
        pair = bench.Pair(ctx, root, one_round=args.one_round)
        try:
            pair.call("LAO", "authorise")
            cpu = {party: pair.call(party, "cpu") for party in ("LAO", "KOR")}
            if args.batch:
                print(pair.call("LAO", "batches", args.count, args.batch, args.in_flight, 1_000))
            else:
                print(pair.call("LAO", "transfers", args.count, args.in_flight, 1_000))
            used = {party: pair.call(party, "cpu") - cpu[party] for party in cpu}
            print(
                f"CPU per transfer: sender {used['LAO'] / args.count * 1e3:.3f} ms, "
                f"receiver {used['KOR'] / args.count * 1e3:.3f} ms"
            )
        finally:
            pair.stop()


if __name__ == "__main__":
    main()
