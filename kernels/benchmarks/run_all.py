"""Runs every kernel benchmark with the same arguments, e.g. `python kernels/benchmarks/run_all.py --device cpu`."""

import subprocess
import sys
from pathlib import Path


BENCHMARKS = ("bench_mask_pool.py", "bench_token_merge.py")


def main():
    for name in BENCHMARKS:
        print(f"==> {name}", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name(name)), *sys.argv[1:]], check=True)
        print(flush=True)


if __name__ == "__main__":
    main()
