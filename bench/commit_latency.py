"""Latency of durable SQLite commits, and what WAL checkpoints add to it.

    .venv/bin/python bench/commit_latency.py --commits 4000 --autocheckpoint 1000

One connection in WAL mode with ``synchronous=FULL``, as the node's store, makes
commits of about 17 pages each (15 row updates spread over a table of 50,000 rows and
one 700-byte insert, about a protocol step) with a short pause between them, and
prints the mean, p50, p90, p99 and maximum commit time. SQLite checkpoints inside the
commit that takes the WAL past ``--autocheckpoint`` pages; ``--background`` instead
runs a PASSIVE checkpoint from a second connection on a thread every 50 ms
(docs/PERFORMANCE.md, round 6).
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/commit_latency.py")
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--autocheckpoint", type=int, default=1000)
    parser.add_argument("--background", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        path = Path(tmp) / "bench.db"
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        conn.execute("CREATE TABLE j (id INTEGER PRIMARY KEY, h BLOB, b BLOB)")
        conn.execute("CREATE INDEX jh ON j (h)")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(200)) for i in range(50_000))
        )
        conn.execute("COMMIT")
        conn.execute(f"PRAGMA wal_autocheckpoint={0 if args.background else args.autocheckpoint}")
        stop = threading.Event()
        if args.background:

            def checkpoints() -> None:
                other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                while not stop.wait(0.05):
                    other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                other.close()

            thread = threading.Thread(target=checkpoints)
            thread.start()
        times = []
        for _ in range(args.commits):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(15):
                conn.execute(
                    "UPDATE t SET v = ? WHERE id = ?", (os.urandom(200), random.randrange(50_000))
                )
            conn.execute("INSERT INTO j (h, b) VALUES (?, ?)", (os.urandom(32), os.urandom(700)))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - started)
            time.sleep(0.0005)
        stop.set()
        if args.background:
            thread.join()
        wal = os.path.getsize(f"{path}-wal")
        conn.close()
    times.sort()
    n = len(times)
    print(
        f"mean {sum(times) / n * 1e3:.3f} ms, p50 {times[n // 2] * 1e3:.3f}, "
        f"p90 {times[int(n * 0.9)] * 1e3:.3f}, p99 {times[int(n * 0.99)] * 1e3:.3f}, "
        f"max {times[-1] * 1e3:.2f} ms; WAL file {wal // 1024} KiB"
    )


if __name__ == "__main__":
    main()
