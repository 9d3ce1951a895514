"""Benchmark the export verbs on a synthetic AdaLoRA adapter with Llama-3-8B shapes.

Compares, in the same run and each in a fresh subprocess (so that peak RSS is its own):
  - copy: safetensors load_file + save_file of the same tensors (what any conversion must at least do);
  - copy of uniform's output: the same, of what `to-lora --layout uniform` wrote (the padded layouts write more
    bytes than they read: this row is the copy of as many bytes as they write);
  - every entry of OPERATIONS: an adaconvert verb through the CLI, as users run it (`to-lora` in both layouts,
    `to-mlx`, `to-gguf`: read, fold scaling, strip, measure errors, write, checks, card + report).
Prints wall time (median of the runs) and peak RSS, their ratios to the copy, and the output size against the compact
layout's. The modes take turns in rounds, and "time / copy" is the median over the rounds of each run's time over the
same round's copy: the machine's speed drifts (the same copy took 0.12 to 0.20 s from one run of this benchmark to the
next), and a ratio within one round is less exposed to it than a ratio of medians. "time / copy of as many bytes"
compares with a copy of the larger of what the operation reads and what it writes: the input's copy, or, for the
padded layouts, which write more than they read, the copy of uniform's output.

    python tools/bench_convert.py                 # 32 layers, init_r 32, float32 (~335 MB, ~320 MiB)
    python tools/bench_convert.py --layers 4      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# measured operation → (adaconvert CLI arguments, suffix of DST): SRC and DST follow the verb, "{base}" is a
# Llama-3-8B config directory (only config.json). Add an export verb here to get its row in the same table; a verb
# writing one file gives its suffix (e.g. ".gguf"), a directory "".
OPERATIONS = {
    "to-lora (compact)": (["to-lora"], ""),
    "to-lora --layout uniform": (["to-lora", "--layout", "uniform"], ""),
    "to-mlx": (["to-mlx", "--base", "{base}"], ""),
    "to-gguf (f32)": (["to-gguf", "--base", "{base}", "--overwrite"], ".gguf"),  # its side files stay
    "to-lora --dtype bfloat16": (["to-lora", "--dtype", "bfloat16"], ""),  # + the cast's error, measured
}

PADDED_COPY = "copy of uniform's output"

# (name, in_features, out_features) of one Llama-3-8B decoder layer
LLAMA3_8B = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 1024),
    ("self_attn.v_proj", 4096, 1024),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 4096, 14336),
    ("mlp.up_proj", 4096, 14336),
    ("mlp.down_proj", 14336, 4096),
]


def make_adapter(path: Path, *, layers: int, init_r: int, pattern: bool, seed: int = 0) -> int:
    """Write a synthetic AdaLoRA checkpoint as PEFT lays it out; return its size in bytes.

    ``pattern`` False: rank_pattern null, full init_r tensors with about half of lora_E zero (masked).
    ``pattern`` True: rank_pattern set, tensors sliced to random kept ranks (some modules 0).
    """
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, rank_pattern = {}, {}
    for layer in range(layers):
        for name, n_in, n_out in LLAMA3_8B:
            module = f"model.layers.{layer}.{name}"
            mask = torch.rand(init_r, generator=g) < 0.5
            k = int(mask.sum()) if pattern else init_r
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A"] = torch.randn(k, n_in, generator=g) * 0.02
            E = torch.randn(k, 1, generator=g)
            tensors[f"{prefix}.lora_E"] = E if pattern else E * mask[:, None]
            tensors[f"{prefix}.lora_B"] = torch.randn(n_out, k, generator=g) * 0.02
            rank_pattern[f"{module}.lora_E"] = mask.tolist()
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
        "init_r": init_r,
        "target_r": init_r // 4,
        "lora_alpha": 32,
        "rank_pattern": rank_pattern if pattern else None,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _, _ in LLAMA3_8B}),
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return (path / "adapter_model.safetensors").stat().st_size


def make_base_config(path: Path, *, layers: int) -> Path:
    """A Llama-3-8B-shaped config.json (no weights): what ``--base`` reads."""
    path.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def child(mode: str, src: str, dst: str, base: str) -> None:
    """Run one measured operation; print {"seconds", "peak_rss"} as JSON on stdout."""
    # torch is imported as the adaconvert command imports it (the cycle collector then skips its ~10⁶ objects,
    # which a collection during the work would otherwise walk: ~0.06 s each) in every mode, and before the clock
    # starts, so only the work is timed: the conversion's own imports are part of it
    from adaconvert.process import import_torch, peak_rss_bytes

    import_torch()
    from safetensors.torch import load_file, save_file

    from adaconvert.cli import main

    start = time.perf_counter()
    if mode == "copy":
        Path(dst).mkdir()
        save_file(load_file(f"{src}/adapter_model.safetensors"), f"{dst}/adapter_model.safetensors")
    elif mode in OPERATIONS:  # through the CLI, as users run it
        verb, *options = (arg.format(base=base) for arg in OPERATIONS[mode][0])
        if main([verb, src, dst, *options, "--quiet"]) != 0:
            raise SystemExit(f"{mode} failed")
    elif mode != "idle":
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes()}))


def _per_round(runs: list[dict], copies: list[dict]) -> float:
    """The median over the rounds of each run's time over the copy's of the same round."""
    return statistics.median(r["seconds"] / c["seconds"] for r, c in zip(runs, copies, strict=True))


def output_bytes(path: Path) -> int:
    """Size of everything written (a directory's files, or one file; 0 when nothing was)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def measure(mode: str, src: Path, dst: Path, base: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
    # the earlier runs' outputs go to disk now, not during this run (the kernel's writeback, on the other core,
    # would slow whichever run it overlaps)
    os.sync()
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(src), str(dst), str(base)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "bytes": output_bytes(dst)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--init-r", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=9, help="runs per mode; the median time and RSS are kept")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SRC", "DST", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="adaconvert-bench-") as tmp:
        tmp = Path(tmp)
        base = make_base_config(tmp / "base", layers=args.layers)
        idle = measure("idle", Path("."), tmp / "idle", base)
        for pattern in (False, True):
            src = tmp / f"adalora-{pattern}"
            size = make_adapter(src, layers=args.layers, init_r=args.init_r, pattern=pattern)
            modes = ("copy", *OPERATIONS)
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            runs[PADDED_COPY] = []
            for _ in range(args.repeat):  # the modes take turns, so that a change in the machine's load hits all
                for i, mode in enumerate(modes):
                    dst = tmp / f"out-{i}{OPERATIONS[mode][1] if mode in OPERATIONS else ''}"
                    runs[mode].append(measure(mode, src, dst, base))
                uniform = tmp / f"out-{modes.index('to-lora --layout uniform')}"
                runs[PADDED_COPY].append(measure("copy", uniform, tmp / "out-copy", base))
            best = {
                mode: {k: statistics.median(r[k] for r in runs[mode]) for k in ("seconds", "peak_rss", "bytes")}
                for mode in runs
            }
            for mode in runs:  # each run against a copy of its own round: the machine's speed drifts between rounds
                best[mode]["ratio"] = _per_round(runs[mode], runs["copy"])
                # against a copy of as many bytes as it moves: the larger of what it reads and what it writes
                moved = max(best[mode]["bytes"] if mode == PADDED_COPY else size, best[mode]["bytes"])
                same = next((c for c in ("copy", PADDED_COPY) if abs(moved - best[c]["bytes"]) <= moved / 100), None)
                best[mode]["same"] = _per_round(runs[mode], runs[same]) if same else None
            rows.append((pattern, size, best))

    mb = 2**20
    print(
        f"\nExports of a synthetic AdaLoRA, Llama-3-8B shapes: {args.layers} layers x 7 projections, "
        f"init_r {args.init_r}, float32; median of {args.repeat}; idle RSS {idle['peak_rss'] / mb:.0f} MiB"
    )
    header = (
        "| rank_pattern | adapter MiB | operation | s | time / copy | time / copy of as many bytes | peak RSS MiB "
        "| RSS / adapter | (RSS - idle) / adapter | output MiB | output / compact |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for pattern, size, best in rows:
        compact = best["to-lora (compact)"]
        for mode, m in best.items():
            same = "-" if m["same"] is None else f"{m['same']:.2f}"
            print(
                f"| {'set' if pattern else 'null'} | {size / mb:.0f} | {mode} | {m['seconds']:.2f} "
                f"| {m['ratio']:.2f} | {same} | {m['peak_rss'] / mb:.0f} | {m['peak_rss'] / size:.2f} "
                f"| {(m['peak_rss'] - idle['peak_rss']) / size:.2f} | {m['bytes'] / mb:.0f} "
                f"| {m['bytes'] / compact['bytes']:.2f} |"
            )


if __name__ == "__main__":
    main()
