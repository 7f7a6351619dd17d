"""Timing, peak-memory and reporting helpers shared by the kernel benchmarks (run them as scripts)."""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


# glibc hands big blocks back to the OS on free only when they were mmap'ed; a fixed threshold (it adapts upwards by
# default) makes every large tensor an mmap, so the resident set follows the live tensors.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def parse_args(description: str, default_repeats: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="input dtype")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed calls per path (median reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: child process measuring one path
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median and best wall time of `fn` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def cpu_peak_bytes_here(fn: Callable[[], object]) -> int:
    """Peak resident memory added by one call of `fn` in this process (Linux).

    After a warm-up call (one-time allocations such as thread pools are not counted) the kernel's high-water mark is
    reset to the current resident set (`echo 5 > /proc/self/clear_refs`), `fn` runs once, and the result is the
    high-water mark (VmHWM) minus the resident set before the call (VmRSS). Inputs are not counted; the output is.
    """
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _proc_status_kib("VmRSS")
    fn()
    return (_proc_status_kib("VmHWM") - before) * 1024


def cpu_peak_bytes_in_subprocess(script: str, path: str, args: argparse.Namespace) -> int:
    """Runs `script --memory-of path` in a fresh process (no other path's memory is counted); returns its peak."""
    forwarded = ["--device", args.device, "--dtype", args.dtype, "--threads", str(torch.get_num_threads())]
    command = [sys.executable, script, "--memory-of", path, *forwarded]
    result = subprocess.run(command, env={**os.environ, **_MALLOC_ENV}, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def report_child_peak(fn: Callable[[], object]) -> None:
    print(json.dumps({"peak_bytes": cpu_peak_bytes_here(fn)}))


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by one call of `fn`, above what was allocated before it."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def device_bandwidth_bytes_per_s() -> float:
    """Theoretical DRAM bandwidth of the current GPU: 2 transfers per memory clock x bus width."""
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 2 * properties.memory_clock_rate * 1e3 * properties.memory_bus_width / 8


def describe_machine(device: str) -> str:
    if device == "cuda":
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = f"{properties.name}, {device_bandwidth_bytes_per_s() / 1e9:.0f} GB/s theoretical"
    else:
        gpu = "CPU only"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads, "
        f"{torch.backends.cpu.get_cpu_capability()}), {gpu}; torch {torch.__version__}, Python "
        f"{platform.python_version()}; load average {load} (other processes skew CPU timings)"
    )


def _peak_bytes(script: str, name: str, fn: Callable[[], object], args: argparse.Namespace) -> float:
    if args.skip_memory:
        return float("nan")
    if args.device == "cuda":
        return cuda_peak_bytes(fn)
    return cpu_peak_bytes_in_subprocess(script, name, args)


def compare_paths(
    script: str,
    paths: dict[str, Callable[[], object]],
    args: argparse.Namespace,
    error_of: Callable[[object], float],
    useful_bytes: float,
) -> dict[str, float]:
    """Times (and measures the peak memory of) every path side by side, prints a table, returns the median times.

    `paths` starts with the `upstream` baseline; `error_of(output)` is a path's largest deviation from it;
    `useful_bytes` is the least memory traffic of the op, for GB/s on CUDA.
    """
    rows, times, best, peaks = [], {}, {}, {}
    for name, fn in paths.items():
        error = error_of(fn())
        repeats = args.repeats if name != "upstream" else max(3, args.repeats // 4)  # the baseline is slow
        times[name], best[name] = time_ms(fn, args.device, repeats)
        peaks[name] = _peak_bytes(script, name, fn, args)
        row = {
            "path": name,
            "median": f"{times[name]:.2f} ms",
            "best": f"{best[name]:.2f} ms",
            "speedup (median)": f"{times['upstream'] / times[name]:.1f}x",
            "speedup (best)": f"{best['upstream'] / best[name]:.1f}x",
            "peak memory": f"{peaks[name] / 2**20:.1f} MiB",
            "memory upstream/path": f"{peaks['upstream'] / peaks[name]:.3g}x" if min(peaks.values()) > 0 else "-",
            "max |diff| vs upstream": f"{error:.1e}",
        }
        if args.device == "cuda":
            bandwidth = useful_bytes / (times[name] * 1e-3)
            row["GB/s"] = f"{bandwidth / 1e9:.0f}"
            row["% of DRAM peak"] = f"{100 * bandwidth / device_bandwidth_bytes_per_s():.0f}%"
        rows.append(row)
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in columns}
    for cells in [{column: column for column in columns}, *rows]:
        print("  ".join(cells[column].ljust(widths[column]) for column in columns))
    if "triton" in times:
        print(f"triton vs torch: {times['torch'] / times['triton']:.1f}x faster")
    return times
