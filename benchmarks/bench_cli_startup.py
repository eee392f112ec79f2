"""Start-up time of the command line: `nodulab --help` and `nodulab scenarios` vs `python -c pass`.

Each command runs in a fresh interpreter; repeats are interleaved and medians compared, so the
ratio says what nodulab adds on top of starting Python itself. Goal: `--help` under 1 s.

    python benchmarks/bench_cli_startup.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "nodulab --help": [sys.executable, "-m", "nodulab", "--help"],
    "nodulab scenarios": [sys.executable, "-m", "nodulab", "scenarios"],
}


def seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for cmd in COMMANDS.values():  # warm the file cache once
        seconds(cmd)
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(seconds(cmd))
    peer = statistics.median(times["python -c pass"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:18s} median {median * 1000:6.0f} ms  ({median / peer:4.1f}x python -c pass)"
            f"  range {min(values) * 1000:.0f}-{max(values) * 1000:.0f} ms"
        )
    help_s = statistics.median(times["nodulab --help"])
    print(f"nodulab --help: {help_s:.2f} s (goal < 1 s: {'met' if help_s < 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
