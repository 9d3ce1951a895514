"""Benchmark `adaconvert merge` against `cp -r` (the I/O floor), `dd` (the floor through user memory) and PEFT's
merge_and_unload, at two model sizes.

The base is synthetic, with Llama-3-8B's layer shapes (hidden 4096, MLP 14336, 32 heads, 8 k/v heads) and a 32000
vocabulary, in bfloat16; the adapter a rank-varying AdaLoRA (init_r 16, about 60% kept) on all 7 projections.
Each method runs in its own process, measured for wall time and peak RSS (``wait4`` from a minimal launcher, whose
~10 MiB is a floor for the figure), after a ``sync`` and with the base already in the page cache. With
``--requantize``, the requantising merge runs twice per round: as usual, and with an empty cache (a merge's first on
a base: which layers a llama base quantises follows from its config, so it costs what the second does; a family
outside ``adaconvert.base.model.KNOWN_QUANTIZED_LAYOUTS`` would import transformers here, once per base config);
its ratios to the plain merge are printed below the table.

    python tools/bench_merge.py                      # 2 and 8 layers (about 1.4 and 4 GB), ~10 min
    python tools/bench_merge.py --layers 1 2 --no-peft
    python tools/bench_merge.py --layers 2 --no-peft --requantize nf4   # also the QLoRA-faithful merge

PEFT holds the whole model in memory (plus its copy while saving): 8 layers need about 9 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

import torch

from adaconvert.testing.synthetic import LlamaShape, write_synthetic_adalora, write_synthetic_llama

DIMS = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 32000}

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


DD = 'mkdir "$2" && for f in "$1"/*; do dd if="$f" of="$2/${f##*/}" bs=16M status=none || exit 1; done'

# Runs argv[1:] and prints the child's peak RSS. A fresh, tiny process: a child inherits its parent's RSS high-water
# mark through fork + exec, so measuring straight from this (large) process would report this process's size.
LAUNCHER = "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, u = os.wait4(p.pid, 0); "
LAUNCHER += "print(u.ru_maxrss * 1024, file=sys.stderr); sys.exit(os.waitstatus_to_exitcode(s))"


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``cmd`` run in a child process (``env`` added to the environment);
    exits if it fails."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LAUNCHER, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{cmd[:4]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, int(done.stderr.strip().splitlines()[-1])


def warm(directory: Path) -> None:
    """Read every file once, so that every method starts from the page cache."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass


def layout(directory: Path) -> dict:
    """Tensor names, shapes and dtypes of a checkpoint, read from its headers only."""
    from adaconvert.io.checkpoint import open_checkpoint

    return {n: (t.dtype, t.shape) for n, t in open_checkpoint(directory).tensors.items()}


def run(layers: int, work: Path, *, peft: bool, init_r: int, repeat: int, requantize: str | None = None) -> list[dict]:
    """Every method on one base size. The methods take turns (cp, dd, ours, cp, dd, ours...) so that a change in
    the machine's load hits all of them alike, and every output is deleted before the next run: a run must not
    pay for evicting the previous run's pages from the page cache."""
    base, adapter = work / f"base-{layers}", work / f"adapter-{layers}"
    if not base.exists():
        print(f"building a {layers}-layer base in {base} ...", file=sys.stderr, flush=True)
        write_synthetic_llama(base, layers=layers, dtype=torch.bfloat16, **DIMS)
        shape = LlamaShape(hidden=4096, intermediate=14336, layers=layers, kv_dim=1024)
        write_synthetic_adalora(adapter, shape=shape, init_r=init_r, target_r=init_r // 2, base_model=str(base))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    warm(base)
    out = work / "out"
    methods = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        # the floor for any tool that brings the bytes into its own memory (cp copies inside the kernel)
        "dd bs=16M": ["sh", "-c", DD, "dd", str(base), str(out)],
        "adaconvert merge": [sys.executable, "-m", "adaconvert.cli", "merge", str(base), str(adapter), str(out), "-q"],
    }
    cold = f"merge --requantize {requantize} (first on this base)"
    if requantize:  # every linear layer quantised and dequantised whole by bitsandbytes before the update
        methods[f"merge --requantize {requantize}"] = [*methods["adaconvert merge"], "--requantize", requantize]
        # with an empty cache: nothing remembered from an earlier merge on this base
        methods[cold] = methods[f"merge --requantize {requantize}"]
    walls: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, list[int]] = {name: [] for name in methods}
    inside, ours = [], {}
    for i in range(repeat):
        for name, cmd in methods.items():
            print(f"  {layers} layers: {name} ({i + 1}/{repeat}) ...", file=sys.stderr, flush=True)
            env = {"ADACONVERT_CACHE": tempfile.mkdtemp(dir=work)} if name == cold else None
            wall, rss = measure(cmd, env)
            walls[name].append(wall)
            peaks[name].append(rss)
            if name == "adaconvert merge":  # time inside merge(), without interpreter and torch start-up
                inside.append(json.loads((out / "merge_report.json").read_text())["seconds"])
                ours = layout(out)
            shutil.rmtree(out)
    if peft:  # slow, and its gap is wide: once is enough
        print(f"  {layers} layers: PEFT merge_and_unload ...", file=sys.stderr, flush=True)
        wall, rss = measure([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)])
        walls["PEFT merge_and_unload"], peaks["PEFT merge_and_unload"] = [wall], [rss]
        same = layout(out) == ours
        shutil.rmtree(out)
        if not same:
            sys.exit("our merged checkpoint and PEFT's do not hold the same tensors")
    rows = [
        {
            "layers": layers,
            "method": name,
            "gb": size / 1e9,
            "wall_s": min(walls[name]),
            "runs": len(walls[name]),
            "peak_rss_mb": max(peaks[name]) / 2**20,
            "all_wall_s": walls[name],
        }
        for name in walls
    ]
    next(r for r in rows if r["method"] == "adaconvert merge")["inside_s"] = min(inside)
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["layers"], r["method"]): r for r in rows}
    lines = [
        "| layers | size | method | wall (best of runs) | wall / cp | in merge() / cp | peak RSS | RSS / PEFT |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cp = by[r["layers"], "cp -r"]
        peft = by.get((r["layers"], "PEFT merge_and_unload"))
        rss_ratio = f"{r['peak_rss_mb'] / peft['peak_rss_mb']:.2f}" if peft else "-"
        inside = f"{r['inside_s'] / cp['wall_s']:.2f} ({r['inside_s']:.1f} s)" if "inside_s" in r else "-"
        lines.append(
            f"| {r['layers']} | {r['gb']:.2f} GB | {r['method']} | {r['wall_s']:.1f} s ({r['runs']}) "
            f"| {r['wall_s'] / cp['wall_s']:.2f} | {inside} | {r['peak_rss_mb']:,.0f} MiB | {rss_ratio} |"
        )
    return "\n".join(lines)


def marginal(rows: list[dict]) -> str | None:
    """Seconds per extra GB between the smallest and the largest base, ours against cp's: the ratio a large model
    converges to, once the fixed costs (interpreter and torch start-up, reading the adapter) are spread thin."""
    sizes = sorted({r["layers"] for r in rows})
    if len(sizes) < 2:
        return None
    by = {(r["layers"], r["method"]): r for r in rows}
    small, large = sizes[0], sizes[-1]

    def per_gb(method):
        a, b = by[small, method], by[large, method]
        return (b["wall_s"] - a["wall_s"]) / (b["gb"] - a["gb"])

    ours, cp = per_gb("adaconvert merge"), per_gb("cp -r")
    return (
        f"marginal cost from {small} to {large} layers: ours {ours:.2f} s/GB, cp {cp:.2f} s/GB, ratio {ours / cp:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--init-r", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="Runs of cp and of our merge; the fastest counts.")
    parser.add_argument("--no-peft", action="store_true", help="Skip PEFT (it needs RAM for the whole model).")
    parser.add_argument("--dir", type=Path, help="Work directory (kept; bases are reused). Default: a temp dir.")
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON here.")
    parser.add_argument("--requantize", choices=("nf4", "fp4"), help="Also time merge --requantize (bitsandbytes).")
    args = parser.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = [
            row
            for n in args.layers
            for row in run(
                n, work, peft=not args.no_peft, init_r=args.init_r, repeat=args.repeat, requantize=args.requantize
            )
        ]
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    ours = [r for r in rows if r["method"] == "adaconvert merge"]
    print(table(rows))
    peaks = ", ".join(f"{r['peak_rss_mb']:,.0f} MiB ({r['layers']} layers)" for r in ours)
    inside = ", ".join(f"{r['inside_s']:.1f} s ({r['layers']} layers)" for r in ours)
    print(f"\nour peak RSS across sizes: {peaks}; time inside merge() (best run): {inside}")
    if line := marginal(rows):
        print(line)
    for r in rows:
        if r["method"].startswith("merge --requantize"):
            plain = next(p for p in ours if p["layers"] == r["layers"])
            print(f"{r['layers']} layers: {r['method']} / adaconvert merge: {r['wall_s'] / plain['wall_s']:.2f}")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
