"""Benchmark training cost: step time and trainable parameters of LoRA, AdaLoRA and LoRA-Drop, as ratios to LoRA.

Every method trains the same random llama (built from a config, nothing downloaded) on the same synthetic data
through ``adaconvert.train``, each in a fresh subprocess so that its peak memory is its own. LoRA-Drop is timed on
its main phase (the pilot is reported apart); it keeps half the layers (``keep_fraction 0.5``) under both
policies, so the two are comparable. AdaLoRA starts at ``init_r 12`` and prunes to ``target_r 8``; LoRA and
LoRA-Drop use rank 8. Every method runs with gradient checkpointing off and on (``--checkpointing``): ratios are
to LoRA with the same setting.

    python tools/bench_train.py                      # CPU, small llama (~13M parameters)
    python tools/bench_train.py --size tiny --steps 8 --threads 1 --checkpointing on
    python tools/gpu_check.py                        # the same on a GPU, 336M parameters, bf16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# runs from a checkout without installing (e.g. a GPU machine with its own packages): the root holds the package;
# spawned workers inherit sys.path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# model sizes: hidden, layers, intermediate, heads (head_dim 64 above tiny), kv heads, vocab; and batch shape
SIZES = {
    "tiny": dict(hidden=64, layers=4, intermediate=128, heads=2, kv_heads=1, vocab=512, seq=64, batch=4),
    "small": dict(hidden=256, layers=8, intermediate=688, heads=4, kv_heads=2, vocab=8192, seq=128, batch=8),
    "gpu": dict(hidden=1024, layers=24, intermediate=2816, heads=16, kv_heads=4, vocab=32000, seq=512, batch=8),
}
METHODS = {
    "lora": ("lora", {"r": 8}),
    "adalora": ("adalora", {"init_r": 12, "target_r": 8}),
    "lora-drop (drop)": ("lora-drop", {"r": 8, "keep_fraction": 0.5, "policy": "drop"}),
    "lora-drop (share)": ("lora-drop", {"r": 8, "keep_fraction": 0.5, "policy": "share"}),
}
WORDS = ["the", "a", "model", "adapter", "rank", "layer", "budget", "token", "weight", "update", "low", "high"]


@dataclass
class Row:
    method: str
    checkpointing: bool
    step_s: float  # fastest optimizer step (first step excluded): the least disturbed by other load, as timeit does
    median_s: float
    tokens_per_s: float
    trainable: int
    pilot_trainable: int | None
    pilot_s: float | None
    peak_rss_mib: float
    peak_gpu_mib: float | None
    kept: list | None
    loss: float


def build_base(directory: Path, size: str, *, dtype: str = "float32") -> int:
    """A random llama of ``size`` with a word-level tokenizer, saved to ``directory``; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adaconvert.demo.tiny import build_tokenizer

    s = SIZES[size]
    build_tokenizer(directory, [" ".join(WORDS)])
    head_dim = 32 if s["hidden"] < 256 else 64
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=head_dim,
        max_position_embeddings=max(2048, s["seq"]),
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def write_data(path: Path, size: str, *, examples: int) -> None:
    """``examples`` lines of random words, each longer than the sequence length (so every batch is full)."""
    import random

    rng = random.Random(0)
    n = SIZES[size]["seq"] + 8
    with path.open("w") as f:
        for _ in range(examples):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")


def run_method(
    name: str, base: str, data: str, out: str, size: str, steps: int, threads: int | None, checkpointing: bool
) -> Row:
    """Train one method (in a fresh process) and measure it."""
    import torch

    from adaconvert.process import peak_rss_bytes
    from adaconvert.training import train

    if threads:
        torch.set_num_threads(threads)
    method, options = METHODS[name]
    s = SIZES[size]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    settings = dict(
        steps=steps,
        batch_size=s["batch"],
        max_length=s["seq"],
        lr=1e-4,
        quiet=True,
        logging_steps=10**6,
        gradient_checkpointing=checkpointing,
        time_steps=True,  # each step's own time, GPU work included
    )
    if method == "adalora":  # a real budget schedule within few steps
        settings.update(tinit=max(1, steps // 10), tfinal=max(1, steps // 5), delta_t=1)
    result = train(method, model=base, data=data, output=out, **settings, **options)
    main, pilot = result.main, result.pilot
    return Row(
        method=name,
        checkpointing=checkpointing,
        step_s=min(main.step_times[1:] or main.step_times),
        median_s=main.median_step_s,
        tokens_per_s=s["batch"] * s["seq"] / min(main.step_times[1:] or main.step_times),
        trainable=main.trainable_params,
        pilot_trainable=pilot.trainable_params if pilot else None,
        pilot_s=pilot.wall_s if pilot else None,
        peak_rss_mib=peak_rss_bytes() / 2**20,
        peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        kept=result.lora_drop["kept"] if result.lora_drop else None,
        loss=main.train_loss,
    )


def run_all(
    size: str, steps: int, *, threads: int | None = None, methods=tuple(METHODS), checkpointing=(False, True)
) -> tuple[list[Row], dict]:
    """Build the model and data once, then every method (for each ``checkpointing`` setting) in its own
    subprocess. Returns (rows, setup info)."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        params = build_base(root / "base", size)
        write_data(root / "data.jsonl", size, examples=max(64, 4 * SIZES[size]["batch"]))
        info = {
            "size": size,
            "params": params,
            "steps": steps,
            "setup_s": time.perf_counter() - started,
            **SIZES[size],
        }
        rows = []
        runs = [(name, ckpt) for ckpt in checkpointing for name in methods]
        for i, (name, ckpt) in enumerate(runs):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                args = (
                    name,
                    str(root / "base"),
                    str(root / "data.jsonl"),
                    str(root / f"out{i}"),
                    size,
                    steps,
                    threads,
                    ckpt,
                )
                rows.append(pool.submit(run_method, *args).result())
    return rows, info


def table(rows: list[Row], info: dict) -> str:
    """A markdown table with ratios to LoRA (the first row with the same checkpointing setting)."""
    refs = {}
    for r in rows:
        refs.setdefault(r.checkpointing, r)
    gpu = any(r.peak_gpu_mib is not None for r in rows)
    head = (
        "| method | checkpointing | step time (best) | vs LoRA | median | tokens/s | trainable params | vs LoRA "
        "| peak RSS |"
    )
    head += " peak GPU mem |" if gpu else ""
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        ref = refs[r.checkpointing]
        line = (
            f"| {r.method} | {'on' if r.checkpointing else 'off'} | {r.step_s * 1e3:.1f} ms | "
            f"{r.step_s / ref.step_s:.2f}× | {r.median_s * 1e3:.1f} ms | "
            f"{r.tokens_per_s:,.0f} | "
            f"{r.trainable:,} | {r.trainable / ref.trainable:.2f}× | {r.peak_rss_mib:,.0f} MiB |"
        )
        lines.append(line + (f" {r.peak_gpu_mib:,.0f} MiB |" if gpu else ""))
    notes = [
        f"model: random llama, {info['params'] / 1e6:.1f}M parameters "
        f"({info['layers']} layers, hidden {info['hidden']}); "
        f"batch {info['batch']} × {info['seq']} tokens; {info['steps']} optimizer steps per method; "
        "step time = fastest step after the first (ratios use it), median beside it",
    ]
    for r in rows:
        if r.pilot_trainable:
            notes.append(
                f"{r.method}, checkpointing {'on' if r.checkpointing else 'off'}: kept layers {r.kept}; "
                f"pilot trained {r.pilot_trainable:,} parameters in {r.pilot_s:.1f} s"
            )
    return "\n".join([*lines, "", *notes])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--checkpointing", choices=("off", "on", "both"), default="both", help="gradient checkpointing (default both)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    checkpointing = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    rows, info = run_all(args.size, args.steps, threads=args.threads, checkpointing=checkpointing)
    if args.json:
        print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(table(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
