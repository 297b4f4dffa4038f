"""Run every benchmark module and print one table of ratios.

Usage: python -m benchmarks.run [--quick] [TOPIC ...]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from benchmarks.common import Ratio


def discover() -> list[str]:
    folder = Path(__file__).parent
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(folder)])
        if m.name.startswith("bench_")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("topics", nargs="*", help="bench_<topic> modules to run")
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    args = parser.parse_args()

    results: list[Ratio] = []
    for name in discover():
        if args.topics and name.removeprefix("bench_") not in args.topics:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        results.extend(module.measure(args.quick))

    print(
        f"{'measurement':58} {'trekeys':>10} {'reference':>10} {'unit':7} "
        f"{'ratio':>7}  target"
    )
    for r in results:
        verdict = "met" if r.passed else "MISSED"
        print(
            f"{r.name:58} {r.measured:10.3f} {r.reference:10.3f} {r.unit:7} "
            f"{r.ratio:7.3f}  {r.target} ({verdict})"
        )
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
