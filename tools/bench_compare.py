"""Benchmark: what ``adaconvert compare`` costs beyond the three training runs it exists to make.

Runs ``adaconvert compare --demo`` (the embedded demo data, the tiny base pretrained first, the demo's 200 steps per
method, vLLM where installed) in a fresh process and splits its wall time: the three ``train`` runs (LoRA-Drop's
pilot included), and the rest — building the demo inputs (pretraining the tiny base), conversion, the vLLM engine's
start, validation, evaluation (loss, ROUGE-L, forgetting for the base and three adapters), reports and charts. The
goal: that rest at most 25 % of the training runs' wall time. The alternative a user would pick is running the
three ``train`` commands by hand: compare's overhead is what it adds to them (building the demo's inputs is listed
apart: a user's own base and data do not need it). Most of the overhead is fixed (the engine's start) or grows with
the eval data, not with the training steps: the benchmark runs the demo's 200 steps and 1000 steps, to show how it
weighs as training grows.

    python tools/bench_compare.py                   # 200 and 1000 steps per method
    python tools/bench_compare.py --steps 400       # one run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.25


def run(steps: int | None) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        output = Path(tmp) / "cmp"
        cmd = [sys.executable, "-m", "adaconvert.cli", "compare", "--demo", "--output", str(output), "--quiet"]
        cmd += ["--steps", str(steps)] if steps else []
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            raise SystemExit(f"compare failed ({proc.returncode}): {proc.stderr[-2000:]}")
        report = json.loads((output / "compare.json").read_text())
        records = {m: json.loads((output / m / "method.json").read_text()) for m in ("lora", "adalora", "lora-drop")}
    return {"report": report, "records": records}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="*", default=[200, 1000], help="optimizer steps per method")
    args = parser.parse_args()
    for i, steps in enumerate(args.steps):
        if i:
            print()
        section(steps)


def section(steps: int) -> None:
    result, process_wall = run(steps)
    report, records = result["report"], result["records"]
    quality = report["quality"]
    train = report["train_seconds"]
    convert = sum(r["convert_s"] for r in records.values())
    parts = [
        ("training: lora, adalora, lora-drop (pilot included)", train),
        ("conversion (to-lora) ×3", convert),
        (f"evaluation engine start ({quality['engine']})", quality.get("engine_start_s", 0.0)),
        ("validation (weights, logits" + (", vLLM)" if quality["engine"] == "vllm" else ")"), quality["validation_s"]),
        ("evaluation: loss, ROUGE-L, forgetting (base + 3 adapters)", quality["evaluation_s"]),
    ]
    inside = report["seconds"]
    parts.append(("reports, charts, bookkeeping", inside - report["inputs_s"] - sum(s for _, s in parts)))
    overhead = inside - train - report["inputs_s"]
    steps = next(iter(records.values()))["optimizer_steps"]
    print(f"`adaconvert compare --demo`, {steps} optimizer steps per method, engine {quality['engine']}:\n")
    print("| stage | seconds | share of training |")
    print("|---|---:|---:|")
    for name, seconds in parts:
        print(f"| {name} | {seconds:.1f} | {seconds / train:.0%} |")
    print(f"| **compare's overhead (all but training)** | **{overhead:.1f}** | **{overhead / train:.0%}** |")
    print(f"| (the demo's inputs: pretraining its tiny base, not counted) | {report['inputs_s']:.1f} | - |")
    print(
        f"\nGoal: overhead ≤ {GOAL:.0%} of the training runs' wall time: "
        f"{'met' if overhead / train <= GOAL else 'NOT met'} ({overhead / train:.0%}). The process took "
        f"{process_wall:.0f} s in all ({process_wall - inside:.0f} s of it starting Python and importing torch and "
        "transformers before compare starts)."
    )


if __name__ == "__main__":
    main()
