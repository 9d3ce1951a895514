"""GPU check: train LoRA, AdaLoRA and LoRA-Drop for a fixed number of steps on a 336M-parameter llama built from
a config (no download), in bf16, and print step time, tokens/s and peak GPU memory per method in one table; then,
with 2 GPUs or more, the same AdaLoRA run under FSDP on all of them (``torchrun``), with step time, peak GPU memory
per process and the final rank pattern, against the single-GPU AdaLoRA run's pattern.

One command, a few minutes on one machine:

    python tools/gpu_check.py            # GPU: size "gpu" (24 layers, hidden 1024, 8 × 512 tokens), 30 steps
    python tools/gpu_check.py --size tiny --steps 8   # the same code on CPU, small (what CI-like machines run)
    python tools/gpu_check.py --fsdp-only --size tiny --steps 8 --nproc 2   # only the FSDP path (gloo on CPU)
    python tools/gpu_check.py --qlora-only --size tiny --steps 8  # only the QLoRA path
    python tools/gpu_check.py --compare-only --size tiny --steps 20  # only `adaconvert compare`

The QLoRA path (run by default where bitsandbytes is installed) trains AdaLoRA on the base loaded in NF4, converts
it, merges it plainly and QLoRA-faithfully (``merge --requantize nf4``), validates the conversion and the faithful
merge against PEFT on the NF4 base, serves the conversion through vLLM where it is installed (on the 16-bit base,
as ``adaconvert serve`` does, against PEFT on that base), and prints each step's time, peak GPU memory and verdict.

The compare path (run by default) is ``adaconvert compare`` on the same real-shaped base and random-word data: LoRA,
AdaLoRA and LoRA-Drop at one budget, converted, validated and evaluated (vLLM where installed, the held-out loss
every few steps, forgetting on other random-word text), its table printed: this is where the README's GPU figures
for ``compare`` come from (tiny-model figures on CPU show the mechanism, not the methods).

Without a GPU it runs unchanged on CPU with the ``small`` size (fp32). Needs only torch, transformers, peft and
adaconvert (no vLLM). The measurements are ``tools/bench_train.py``'s (step times with the GPU synchronised).
It also prints the GPU's compute capability and what ``--precision auto`` picks on it (fp16 before Ampere).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import SIZES, build_base, run_all, table, write_data  # tools/ is not a package: imported by path


def environment() -> str:
    import peft
    import torch
    import transformers

    from adaconvert.training.trainer import resolve_precision

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}, compute capability {major}.{minor}"
    else:
        device = "CPU"
    return (
        f"device: {device} (precision auto: {resolve_precision('auto')}); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


ADALORA = {"init_r": 12, "target_r": 8}


def adalora_settings(size: str, steps: int) -> dict:
    """The AdaLoRA run of both paths: a real budget schedule within few steps, step times synchronised."""
    s = SIZES[size]
    return dict(
        steps=steps, batch_size=s["batch"], max_length=s["seq"], lr=1e-4, quiet=True, logging_steps=10**6,
        tinit=max(1, steps // 10), tfinal=max(1, steps // 5), delta_t=1, time_steps=True, **ADALORA,
    )  # fmt: skip


def fsdp_worker(base: str, data: str, out: str, size: str, steps: int) -> None:
    """One process of the FSDP run (under torchrun): AdaLoRA with --fsdp; writes its numbers to out/rank<N>.json."""
    import torch

    from adaconvert.training import train

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.cuda.reset_peak_memory_stats()
    result = train(
        "adalora", model=base, data=data, output=f"{out}/adapter", fsdp=True, **adalora_settings(size, steps)
    )
    record = {
        "rank": int(os.environ["RANK"]),
        "median_step_s": result.main.median_step_s,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "ranks": result.ranks,
        "target_budget": result.rank_history["target_budget"],
    }
    Path(out, f"rank{record['rank']}.json").write_text(json.dumps(record))


def fsdp_check(size: str, steps: int, nproc: int) -> str:
    """The FSDP run on ``nproc`` processes and the same AdaLoRA run on one, compared; a markdown report."""
    from adaconvert.training import train

    with tempfile.TemporaryDirectory(prefix="gpu-check-fsdp-") as tmp:
        root = Path(tmp)
        build_base(root / "base", size)
        # every process gets its own micro-batches: the data must cover nproc × batch
        write_data(root / "data.jsonl", size, examples=max(64, 4 * nproc * SIZES[size]["batch"]))
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), __file__, "--fsdp-worker",
               str(root / "base"), str(root / "data.jsonl"), str(root), size, str(steps)]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - started
        records = [json.loads((root / f"rank{r}.json").read_text()) for r in range(nproc)]
        # the same run on one process, with nproc × the batch: the same examples per optimizer step
        single = adalora_settings(size, steps)
        single["batch_size"] *= nproc
        one = train("adalora", model=str(root / "base"), data=str(root / "data.jsonl"), output=str(root / "one"),
                    **single)  # fmt: skip
    lines = [
        f"### FSDP: AdaLoRA on {nproc} processes ({size} model, {steps} steps, batch {SIZES[size]['batch']} × "
        f"{SIZES[size]['seq']} tokens per process; launch and run {wall:.0f} s)",
        "",
        "| process | median step | peak GPU mem | total rank | budget |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        gpu = f"{r['peak_gpu_mib']:,.0f} MiB" if r["peak_gpu_mib"] is not None else "n/a (CPU)"
        lines.append(
            f"| {r['rank']} | {r['median_step_s'] * 1e3:.1f} ms | {gpu} | {sum(r['ranks'].values())} | "
            f"{r['target_budget']} |"
        )
    same = all(r["ranks"] == one.ranks for r in records)
    lines += ["", f"rank pattern: {records[0]['ranks']}", f"same rank pattern as on one process: {same}"]
    return "\n".join(lines)


def qlora_check(size: str, steps: int) -> str:
    """Train on a 4-bit base, convert, merge with requantisation, validate (and serve through vLLM where it is
    installed); a markdown report of each step's time, peak GPU memory and result."""
    import importlib.util

    import torch

    import adaconvert

    def peak() -> str:
        return f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if torch.cuda.is_available() else "n/a (CPU)"

    rows = []

    def step(name: str, fn):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = fn()
        rows.append((name, time.perf_counter() - started, peak()))
        return result

    with_vllm = importlib.util.find_spec("vllm") is not None
    with tempfile.TemporaryDirectory(prefix="gpu-check-qlora-") as tmp:
        root = Path(tmp)
        build_base(root / "base", size, dtype="bfloat16" if torch.cuda.is_available() else "float32")
        write_data(root / "data.jsonl", size, examples=max(64, 4 * SIZES[size]["batch"]))
        base, adapter, data = str(root / "base"), str(root / "adalora"), str(root / "data.jsonl")
        settings = adalora_settings(size, steps)
        step("train adalora on nf4", lambda: adaconvert.train("adalora", model=base, data=data, output=adapter,
                                                              quantize="nf4", **settings))  # fmt: skip
        step("to-lora", lambda: adaconvert.to_lora(adapter, root / "lora"))
        step("merge (plain)", lambda: adaconvert.merge(base, [adapter], root / "merged"))
        step("merge --requantize nf4", lambda: adaconvert.merge(base, [adapter], root / "merged-q", requantize="nf4"))
        checks = {"raise_on_failure": False, "progress": False}
        reports = [
            step("validate --quantize nf4 --merged (requantised)", lambda: adaconvert.validate(
                base, adapter, root / "lora", merged=[root / "merged-q"], quantize="nf4", **checks)),
        ]  # fmt: skip
        if with_vllm:  # served as vLLM serves it: the converted adapter on the 16-bit base
            reports.append(step("validate --vllm (16-bit base)", lambda: adaconvert.validate(
                base, adapter, root / "lora", vllm=True, **checks)))  # fmt: skip
    lines = [
        f"### QLoRA: AdaLoRA on an NF4 base ({size} model, {steps} steps)",
        "",
        "| step | time | peak GPU mem |",
        "|---|---|---|",
        *(f"| {name} | {seconds:.1f} s | {mem} |" for name, seconds, mem in rows),
        "",
        *(
            f"validation ({', '.join(r.levels)}): {'passed' if r.passed else 'FAILED'}, {len(r.checks)} checks"
            + "".join(f"\n  {problem}" for problem in r.problems)
            for r in reports
        ),
        *([] if with_vllm else ["vLLM is not installed: the adapter was not served"]),
    ]
    return "\n".join(lines)


def compare_check(size: str, steps: int) -> str:
    """``adaconvert compare`` of the three methods on a ``size`` base; its table."""
    from adaconvert.comparison import compare

    s = SIZES[size]
    with tempfile.TemporaryDirectory(prefix="gpu-check-compare-") as tmp:
        root = Path(tmp)
        build_base(root / "base", size)
        for name, examples in (("train", 40 * s["batch"]), ("eval", 2 * s["batch"]), ("general", 2 * s["batch"])):
            write_data(root / f"{name}.jsonl", size, examples=examples)
        started = time.perf_counter()
        report = compare(
            model=str(root / "base"),
            data=str(root / "train.jsonl"),
            eval_data=str(root / "eval.jsonl"),
            reference_data=str(root / "general.jsonl"),
            output=str(root / "compare"),
            steps=steps,
            eval_steps=max(1, steps // 10),
            batch_size=s["batch"],
            max_length=s["seq"],
            r=8,
            keep_fraction=0.5,
            quiet=True,
        )
        seconds = time.perf_counter() - started
    lines = [f"compare path ({size}, {steps} steps per method, {seconds:.0f} s):", report.table()]
    if report.failures:
        lines.append(f"FAILED: {report.failures}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    if argv is None and sys.argv[1:2] == ["--fsdp-worker"]:
        base, data, out, size, steps = sys.argv[2:7]
        fsdp_worker(base, data, out, size, int(steps))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu on a GPU, small on CPU")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method (default 30)")
    parser.add_argument("--nproc", type=int, help="FSDP processes (default: every GPU; FSDP needs 2 or more)")
    parser.add_argument("--fsdp-only", action="store_true", help="only the FSDP path")
    parser.add_argument("--qlora-only", action="store_true", help="only the QLoRA path")
    parser.add_argument("--compare-only", action="store_true", help="only the compare path")
    args = parser.parse_args(argv)
    size = args.size or ("gpu" if torch.cuda.is_available() else "small")
    nproc = args.nproc or torch.cuda.device_count()
    print(environment(), flush=True)
    started = time.perf_counter()
    if args.compare_only:
        print(compare_check(size, args.steps), flush=True)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        return 0
    if not (args.fsdp_only or args.qlora_only):
        rows, info = run_all(size, args.steps)
        print(table(rows, info), flush=True)
    if not args.qlora_only:
        if nproc >= 2:
            print("\n" + fsdp_check(size, args.steps, nproc), flush=True)
        else:
            print("\nFSDP path: needs 2 or more processes (one GPU each); this machine has fewer (--nproc N on CPU)")
    if not args.fsdp_only:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            print("\n" + qlora_check(size, args.steps), flush=True)
        else:
            print("\nQLoRA path: bitsandbytes is not installed (pip install 'adaconvert[qlora]')")
    if not (args.fsdp_only or args.qlora_only):
        print("\n" + compare_check(size, args.steps), flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
