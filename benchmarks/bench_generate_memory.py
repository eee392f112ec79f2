"""Peak memory of `nodulab generate` streaming a large 2D dataset to disk.

Runs the CLI in a child process and reads its peak resident set size (ru_maxrss).

    python benchmarks/bench_generate_memory.py [--total 100000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=100_000, help="samples over the three splits of 'clean'")
    args = parser.parse_args()
    per_split = -(-args.total // 3)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clean"
        cmd = [sys.executable, "-m", "nodulab", "generate", "clean", "--out", str(out), "--n", str(per_split)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"generate clean, {3 * per_split} samples 64x64: {seconds:.1f} s, {size_mb:.0f} MiB on disk, "
        f"peak RSS {peak_mb:.0f} MiB (goal < 2048 MiB)"
    )


if __name__ == "__main__":
    main()
