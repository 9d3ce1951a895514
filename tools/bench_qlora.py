"""Benchmark QLoRA: base memory and step time of LoRA, AdaLoRA and LoRA-Drop on an NF4 base, as ratios to the
same method on the float32 base, in one run.

The model and data are bench_train.py's (a random llama built from a config, nothing downloaded). Every run trains
through ``adaconvert.train`` in a fresh subprocess, so that its peak RSS is its own. "Base weights" is the memory
the loaded base holds once prepared for training: its parameters and buffers (NF4: packed 4-bit codes, block scales
and the float32 embeddings and head), adapters excluded; the linear layers, the part 4-bit quantises, are shown
apart. On CPU bitsandbytes dequantises every 4-bit weight in each forward and backward pass; the peak RSS of a
process is mostly the interpreter, torch and the activations, which quantisation does not touch.

    python tools/bench_qlora.py                      # small llama (~13M parameters), 10 steps per run
    python tools/bench_qlora.py --size tiny --steps 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import METHODS, SIZES, build_base, write_data

RUNS = ("lora", "adalora", "lora-drop (share)")
QUANTIZATIONS = (None, "nf4")


@dataclass
class Row:
    method: str
    quantize: str | None
    base_mib: float
    linear_mib: float  # the part of base_mib in the layers 4-bit quantises (every linear layer but the head)
    step_s: float  # fastest optimizer step after the first
    median_s: float
    peak_rss_mib: float
    loss: float


def base_bytes(model) -> tuple[int, int]:
    """(all, linear): bytes of the base's parameters and buffers (4-bit: packed codes plus their quantisation
    state), adapters excluded, and the part of them in linear layers other than the head."""
    import torch

    linear_weights = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head")
    }
    total = linear = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name:
            continue
        size = tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # double quantisation nests a second state for the block scales
            size += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            state = getattr(state, "state2", None)
        total += size
        linear += size if name in linear_weights else 0
    return total, linear


def run_one(name: str, quantize: str | None, base: str, data: str, out: str, size: str, steps: int, threads) -> Row:
    import torch

    from adaconvert.process import peak_rss_bytes
    from adaconvert.training import train

    if threads:
        torch.set_num_threads(threads)
    method, options = METHODS[name]
    s = SIZES[size]
    settings = dict(steps=steps, batch_size=s["batch"], max_length=s["seq"], lr=1e-4, quiet=True)
    settings.update(logging_steps=10**6, time_steps=True, quantize=quantize)
    if method == "adalora":
        settings.update(tinit=max(1, steps // 10), tfinal=max(1, steps // 5), delta_t=1)
    result = train(method, model=base, data=data, output=out, **settings, **options)
    main = result.main
    total, linear = base_bytes(result.model)
    return Row(
        method=name,
        quantize=quantize,
        base_mib=total / 2**20,
        linear_mib=linear / 2**20,
        step_s=min(main.step_times[1:] or main.step_times),
        median_s=main.median_step_s,
        peak_rss_mib=peak_rss_bytes() / 2**20,
        loss=main.train_loss,
    )


def run_all(size: str, steps: int, threads: int | None) -> tuple[list[Row], dict]:
    from adaconvert.process import import_deepspeed_logging_to_stderr

    import_deepspeed_logging_to_stderr(quiet=True)  # the base is built here: no DeepSpeed line in the table
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        root = Path(tmp)
        params = build_base(root / "base", size)
        write_data(root / "data.jsonl", size, examples=max(64, 4 * SIZES[size]["batch"]))
        rows = []
        for i, (name, quantize) in enumerate((n, q) for n in RUNS for q in QUANTIZATIONS):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                args = (name, quantize, str(root / "base"), str(root / "data.jsonl"), str(root / f"out{i}"))
                rows.append(pool.submit(run_one, *args, size, steps, threads).result())
    return rows, {"size": size, "params": params, "steps": steps, **SIZES[size]}


def table(rows: list[Row], info: dict) -> str:
    """Markdown: each NF4 row with its ratios to the same method on the float32 base."""
    ref = {r.method: r for r in rows if r.quantize is None}
    head = (
        "| method | base | base weights | vs fp32 | of which linear layers | vs fp32 | step time (best) | vs fp32 "
        "| median | peak RSS | vs fp32 |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        f = ref[r.method]
        lines.append(
            f"| {r.method} | {r.quantize or 'float32'} | {r.base_mib:,.1f} MiB | {r.base_mib / f.base_mib:.2f}× | "
            f"{r.linear_mib:,.1f} MiB | {r.linear_mib / f.linear_mib:.2f}× | "
            f"{r.step_s * 1e3:.1f} ms | {r.step_s / f.step_s:.2f}× | {r.median_s * 1e3:.1f} ms | "
            f"{r.peak_rss_mib:,.0f} MiB | {r.peak_rss_mib / f.peak_rss_mib:.2f}× |"
        )
    note = (
        f"model: random llama, {info['params'] / 1e6:.1f}M parameters ({info['layers']} layers, hidden "
        f"{info['hidden']}, vocabulary {info['vocab']}); batch {info['batch']} × {info['seq']} tokens; "
        f"{info['steps']} optimizer steps per run; NF4 with double quantisation, float32 compute"
    )
    return "\n".join([*lines, "", note])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows, info = run_all(args.size, args.steps, args.threads)
    if args.json:
        print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(table(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
