"""Run the simulator: ``python -m tests.sim --seeds 10000`` or ``--seed N --verbose``."""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.simulator import InvariantViolation, Simulation


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--seed", type=int, help="replay one seed")
    parser.add_argument("--seeds", type=int, default=10_000, help="sweep seeds 0..N-1")
    parser.add_argument("--first", type=int, default=0, help="first seed of the sweep")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    started = time.monotonic()
    failures = 0
    for count, seed in enumerate(seeds, start=1):
        simulation = Simulation(seed, steps=args.steps, verbose=args.verbose)
        try:
            simulation.run()
        except InvariantViolation as violation:
            failures += 1
            print(f"FAILED {violation}\n  replay: python -m tests.sim --seed {seed} --verbose")
        if count % 500 == 0:
            print(
                f"{count} seeds, {failures} failed, {time.monotonic() - started:.0f}s", flush=True
            )
    print(f"{len(seeds) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
