"""Write the seed corpora of the atheris harnesses: fuzz/seeds/<harness>/<name>.

    .venv/bin/python fuzz/make_seeds.py [output directory]

The seeds are LAO's real envelopes from a LAO/KOR exchange (authorisation, issuance,
proposals, completions), encoded for each harness' modes. Keys and clocks are fixed, so the
seeds are the same bytes on every run and stay valid under the harness' pinned keys. They
are generated, not committed (see .gitignore).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("envelope", "delivery")


def write_seeds(out: Path = HERE / "seeds") -> dict[str, int]:
    """(Re)write every harness' seed directory; returns the number of seeds per harness."""
    sys.path.insert(0, str(HERE))
    logging.disable(logging.CRITICAL)
    import fuzz_delivery
    import fuzz_envelope

    counts = {}
    for name, module in (("envelope", fuzz_envelope), ("delivery", fuzz_delivery)):
        directory = out / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        seeds = module.seeds()
        for seed_name, data in seeds.items():
            (directory / seed_name).write_bytes(data)
        counts[name] = len(seeds)
    return counts


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "seeds"
    for name, count in write_seeds(out).items():
        print(f"{out / name}: {count} seeds")


if __name__ == "__main__":
    main()
