"""Run the benchmarks and rewrite their sections of ``docs/benchmarks.md`` with what they printed.

Every figure in docs/benchmarks.md comes from a run of this script: each benchmark runs as its own process, its
stdout (the markdown table and the lines around it) goes into the file verbatim, under a heading that names the
command, the machine (CPU model, cores, memory), the date, torch's version and the load average before and after
the run. Sections of benchmarks not run this time are kept as they were.

    python tools/bench.py                  # every benchmark (tens of minutes on 2 cores)
    python tools/bench.py convert merge    # a named subset (make bench BENCH="convert merge")
    python tools/bench.py --list
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
# name → (script, arguments): the sizes documented in each script's docstring as its defaults
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "convert": ("bench_convert.py", []),
    "merge": ("bench_merge.py", ["--requantize", "nf4"]),
    "batch": ("bench_batch.py", []),
    "train": ("bench_train.py", []),
    "serve": ("bench_serve.py", []),
    "resolver": ("bench_resolver.py", []),
    "qlora": ("bench_qlora.py", []),
    "compare": ("bench_compare.py", []),
    "eval": ("bench_eval.py", []),
}
HEADER = """# Benchmarks

Written by `tools/bench.py` (`make bench`, or `make bench BENCH="convert merge"` for some): each section is the
output of one benchmark run, unedited, with the machine and the date it ran on. Do not edit the sections by hand;
run the benchmark again. What each benchmark compares, and how, is in the docstring of its script in `tools/`.
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = ""
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{memory}, {platform.system()} {platform.release()}"


def torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True)
    return out.stdout.decode().strip() or "?"


def run(name: str) -> str:
    script, args = BENCHMARKS[name]
    command = ["python", f"tools/{script}", *args]
    print(f"== {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], cwd=ROOT, stdout=subprocess.PIPE)
    if proc.returncode:
        raise SystemExit(f"{script} failed with exit code {proc.returncode}; {DOC} not changed")
    output = proc.stdout.decode().strip()
    print(output)
    return (
        f"`{' '.join(command)}` — {started:%Y-%m-%d %H:%M} UTC, {machine()}, torch {torch_version()}, "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n\n{output}\n"
    )


def rewrite(sections: dict[str, str]) -> None:
    """Replace (or append) each ``name``'s section between its markers; keep every other section."""
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else HEADER
    for name, body in sections.items():
        block = f"<!-- bench:{name} -->\n## {name}\n\n{body}<!-- /bench:{name} -->"
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        text = pattern.sub(lambda _m, b=block: b, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    DOC.parent.mkdir(exist_ok=True)
    tmp = DOC.with_name(f".{DOC.name}.tmp")
    tmp.write_text(text.rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args()
    if args.list:
        for name, (script, extra) in BENCHMARKS.items():
            print(f"{name}: tools/{script} {' '.join(extra)}".rstrip())
        return
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    rewrite({name: run(name) for name in args.names or BENCHMARKS})
    print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
