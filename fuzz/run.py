"""Run the atheris harnesses side by side (one process each) and summarise them.

    .venv/bin/python fuzz/run.py --seconds 20              # bounded run (make test)
    .venv/bin/python fuzz/run.py --seconds 600 --keep      # long run (make fuzz)

Each harness starts from its generated seeds (fuzz/make_seeds.py). With --keep the corpus
libFuzzer grows is kept in fuzz/corpus/<harness> and reused by the next run; without it the
run uses a temporary corpus and leaves nothing behind. A crash is written to
fuzz/artifacts/<harness>-crash-<sha1>; reproduce it with
``.venv/bin/python fuzz/fuzz_<harness>.py fuzz/artifacts/<file>``. The exit status is
non-zero if any harness found a crash or a property violation.

If atheris is not installed (it ships wheels for Linux x86_64 only), this prints why and
exits 0, so that ``make test`` still passes on other machines.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("envelope", "delivery")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="-max_total_time per harness")
    parser.add_argument("--runs", type=int, default=0, help="-runs per harness (0: no limit)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus in fuzz/corpus")
    parser.add_argument("harness", nargs="*", help=f"some of {', '.join(HARNESSES)} (default: all)")
    args = parser.parse_args()
    for name in args.harness:
        if name not in HARNESSES:
            parser.error(f"unknown harness {name!r}: choose from {', '.join(HARNESSES)}")
    args.harness = args.harness or list(HARNESSES)
    if importlib.util.find_spec("atheris") is None:
        print("fuzz: atheris is not installed in this environment; skipping the atheris run")
        return 0

    sys.path.insert(0, str(HERE))
    from make_seeds import write_seeds

    seeds = HERE / "seeds"
    write_seeds(seeds)
    artifacts = HERE / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="itmolink-fuzz-run-") as tmp:
        procs = {}
        for name in args.harness:
            corpus = HERE / "corpus" / name if args.keep else Path(tmp) / "corpus" / name
            corpus.mkdir(parents=True, exist_ok=True)
            log = Path(tmp) / f"{name}.log"
            command = [
                sys.executable,
                str(HERE / f"fuzz_{name}.py"),
                f"-max_total_time={args.seconds}",
                f"-artifact_prefix={artifacts}/{name}-",
                "-print_final_stats=1",
                "-timeout=30",
                "-rss_limit_mb=4096",
                *([f"-runs={args.runs}"] if args.runs else []),
                str(corpus),
                str(seeds / name),
            ]
            print(f"fuzz: {' '.join(command[1:])}", flush=True)
            # libFuzzer ends the process without running atexit handlers: let the harness'
            # temporary databases live in our temporary directory.
            env = {**os.environ, "TMPDIR": tmp}
            with log.open("wb") as out:
                procs[name] = (
                    subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env),  # noqa: S603
                    log,
                    time.monotonic(),
                )
        failed = []
        for name, (proc, log, started) in procs.items():
            code = proc.wait()
            elapsed = time.monotonic() - started
            text = log.read_text(errors="replace")
            runs = re.findall(r"stat::number_of_executed_units: (\d+)", text)
            cov = re.findall(r"\bcov: (\d+)", text)
            summary = (
                f"fuzz_{name}: exit {code}, {runs[-1] if runs else '?'} executions "
                f"in {elapsed:.0f} s, coverage {cov[-1] if cov else '?'} edges"
            )
            print(summary, flush=True)
            if code != 0:
                failed.append(name)
                print(text[-6000:], flush=True)
    if failed:
        print(f"fuzz: FAILED: {', '.join(failed)} (inputs in {artifacts})", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
