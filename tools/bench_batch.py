"""Benchmark batch conversion: N synthetic Llama-2-7B-shaped AdaLoRA adapters, ``to-lora --output-dir --jobs J``.

Compared, in the same run, with what a user does without batch mode: a shell loop of ``adaconvert to-lora SRC DST``
(one process per adapter), measured on the first ``--loop`` adapters and reported per adapter. Each configuration
runs as its own ``adaconvert`` process; the RSS of its process tree is sampled every 50 ms (peak of the sum, and peak
of the largest single process).

Usage:
    python tools/bench_batch.py                       # 100 adapters, init_r 4, jobs 1 and 2 (best of 2), loop over 10
    python tools/bench_batch.py --adapters 20 --init-r 2 --jobs 1 2 --loop 5 --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADACONVERT = [sys.executable, "-m", "adaconvert.cli"]


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing


def make_sources(root: Path, n: int, init_r: int) -> list[Path]:
    from adaconvert.testing.synthetic import LLAMA_7B, write_synthetic_adalora

    return [
        write_synthetic_adalora(root / f"run-{i:03d}", shape=LLAMA_7B, init_r=init_r, target_r=init_r // 2, seed=i)
        for i in range(n)
    ]


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """(seconds, peak total RSS of the process tree, peak RSS of its largest process), in bytes."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = largest = 0
    done = threading.Event()

    def sample():
        nonlocal peak, largest
        root = psutil.Process(proc.pid)
        while not done.wait(0.05):
            try:
                rss = [p.memory_info().rss for p in (root, *root.children(recursive=True))]
            except psutil.Error:  # a process ended between listing and reading
                continue
            peak, largest = max(peak, sum(rss)), max(largest, *rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): {err.decode()[-2000:]}")
    return seconds, peak, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--init-r", type=int, default=4)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2, help="runs per --jobs value; the best is reported")
    parser.add_argument("--loop", type=int, default=10, help="adapters for the one-process-per-adapter baseline")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory, removed afterwards")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        t = time.perf_counter()
        sources = make_sources(workdir / "sources", args.adapters, args.init_r)
        size = sum(f.stat().st_size for s in sources for f in s.iterdir())
        print(
            f"{args.adapters} synthetic Llama-2-7B-shaped AdaLoRA adapters (32 layers × 7 modules, init_r "
            f"{args.init_r}, float32): {size / 2**30:.2f} GiB, made in {time.perf_counter() - t:.0f} s; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
        )
        rows = []
        best: dict[int, tuple[float, int, int]] = {}
        for repeat in range(args.repeat):  # alternate the order, keep each mode's best run: the machine is shared
            for n_jobs in args.jobs if repeat % 2 == 0 else args.jobs[::-1]:
                out = workdir / f"out-jobs{n_jobs}"
                cmd = [*ADACONVERT, "to-lora", *map(str, sources), "--output-dir", str(out), "-j", str(n_jobs), "-q"]
                os.sync()
                run = measure(cmd)
                print(f"  run {repeat + 1}, --jobs {n_jobs}: {run[0]:.1f} s (load average {os.getloadavg()[0]:.1f})")
                best[n_jobs] = min(best.get(n_jobs, run), run)
                shutil.rmtree(out)
        for n_jobs in args.jobs:
            rows.append((f"to-lora --output-dir --jobs {n_jobs}", args.adapters, *best[n_jobs]))
        if args.loop:
            loop = sources[: args.loop]
            out = workdir / "out-loop"
            start = time.perf_counter()
            tree = largest = 0
            for src in loop:
                _, t_tree, t_largest = measure([*ADACONVERT, "to-lora", str(src), str(out / src.name), "-q"])
                tree, largest = max(tree, t_tree), max(largest, t_largest)
            rows.append(("loop: to-lora SRC DST per adapter", len(loop), time.perf_counter() - start, tree, largest))
            shutil.rmtree(out)

        base = rows[0][1] / rows[0][2]
        print()
        print("| mode | adapters | total s | adapters/s | vs --jobs 1 | peak RSS, all processes | largest process |")
        print("|---|---|---|---|---|---|---|")
        for mode, n, seconds, tree, largest in rows:
            rate = n / seconds
            print(
                f"| {mode} | {n} | {seconds:.1f} | {rate:.2f} | {rate / base:.2f}× | {tree / 2**30:.2f} GiB "
                f"| {largest / 2**30:.2f} GiB |"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
