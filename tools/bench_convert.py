"""Benchmark `to-lora` on a synthetic AdaLoRA adapter with Llama-3-8B shapes.

Compares, in the same run and each in a fresh subprocess (so that peak RSS is its own):
  - copy:    safetensors load_file + save_file of the same tensors (what any conversion must at least do);
  - convert: `adaconvert to-lora` (read, fold scaling, strip, measure errors, write, check, card + report);
  - gguf:    `adaconvert to-gguf` (the same pipeline, one f32 GGUF file + report + card), in a table of its own.
Prints wall time and peak RSS, the ratios, and the adapter size.

    python tools/bench_convert.py                 # 32 layers, init_r 32, float32 (~335 MB)
    python tools/bench_convert.py --layers 4      # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def child(mode: str, src: str, dst: str) -> None:
    """Run one measured operation; print {"seconds", "peak_rss"} as JSON on stdout."""
    # imports happen before the clock starts in every mode, so only the work is timed (the model card's
    # huggingface_hub import is a fixed per-process cost, about 0.1-0.3 s, reported by the "idle" run's RSS only)
    import gguf  # noqa: F401
    import huggingface_hub  # noqa: F401
    from safetensors.torch import load_file, save_file

    from adaconvert.cli import main
    from adaconvert.runtime import peak_rss_bytes

    start = time.perf_counter()
    if mode == "copy":
        Path(dst).mkdir()
        save_file(load_file(f"{src}/adapter_model.safetensors"), f"{dst}/adapter_model.safetensors")
    elif mode == "convert":  # through the CLI, as users run it
        if main(["to-lora", src, dst, "--quiet"]) != 0:
            raise SystemExit("conversion failed")
    elif mode == "gguf":  # base config written by gguf_table beside the adapter
        if main(["to-gguf", src, f"{dst}/adapter.gguf", "--base", f"{src}-base", "--quiet"]) != 0:
            raise SystemExit("GGUF export failed")
    elif mode != "idle":
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes()}))


def measure(mode: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(src), str(dst)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--init-r", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; the best time and RSS are kept")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    idle = measure("idle", Path("."), Path(tempfile.gettempdir()) / "adaconvert-bench-idle")
    rows = []
    with tempfile.TemporaryDirectory(prefix="adaconvert-bench-") as tmp:
        tmp = Path(tmp)
        for pattern in (False, True):
            src = tmp / f"adalora-{pattern}"
            size = make_adapter(src, layers=args.layers, init_r=args.init_r, pattern=pattern)
            best = {}
            for mode in ("copy", "convert"):
                runs = [measure(mode, src, tmp / f"out-{mode}") for _ in range(args.repeat)]
                best[mode] = {k: min(r[k] for r in runs) for k in ("seconds", "peak_rss")}
            rows.append((pattern, size, best))

    mb = 2**20
    print(
        f"\nto-lora on a synthetic AdaLoRA, Llama-3-8B shapes: {args.layers} layers x 7 projections, "
        f"init_r {args.init_r}, float32; best of {args.repeat}; python+torch idle RSS {idle['peak_rss'] / mb:.0f} MiB"
    )
    header = (
        "| rank_pattern | adapter MiB | copy s | convert s | time ratio | copy RSS MiB | convert RSS MiB "
        "| RSS / adapter | (RSS - idle) / adapter |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for pattern, size, best in rows:
        c, v = best["copy"], best["convert"]
        print(
            f"| {'set' if pattern else 'null'} | {size / mb:.0f} | {c['seconds']:.2f} | {v['seconds']:.2f} "
            f"| {v['seconds'] / c['seconds']:.2f} | {c['peak_rss'] / mb:.0f} | {v['peak_rss'] / mb:.0f} "
            f"| {v['peak_rss'] / size:.2f} | {(v['peak_rss'] - idle['peak_rss']) / size:.2f} |"
        )
    gguf_table(args, idle)


# Llama-3-8B's config.json, as far as to-gguf reads it (architecture, heads, layers, tied embeddings)
LLAMA3_8B_CONFIG = {
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "tie_word_embeddings": False,
}


def gguf_table(args, idle: dict) -> None:
    """`to-gguf` (f32) of the rank_pattern-null adapter against the same copy, in a table of its own."""
    mb = 2**20
    with tempfile.TemporaryDirectory(prefix="adaconvert-bench-gguf-") as tmp:
        src = Path(tmp) / "adalora"
        size = make_adapter(src, layers=args.layers, init_r=args.init_r, pattern=False)
        base = Path(f"{src}-base")
        base.mkdir()
        (base / "config.json").write_text(json.dumps({**LLAMA3_8B_CONFIG, "num_hidden_layers": args.layers}))
        best = {}
        for mode in ("copy", "gguf"):
            runs = [measure(mode, src, Path(tmp) / f"out-{mode}") for _ in range(args.repeat)]
            best[mode] = {k: min(r[k] for r in runs) for k in ("seconds", "peak_rss")}
        gguf_size = (Path(tmp) / "out-gguf" / "adapter.gguf").stat().st_size
    c, g = best["copy"], best["gguf"]
    print(f"\nto-gguf --outtype f32 of the same adapter (rank_pattern null); best of {args.repeat}")
    header = (
        "| adapter MiB | GGUF MiB | copy s | to-gguf s | time ratio | copy RSS MiB | to-gguf RSS MiB | RSS / adapter |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    print(
        f"| {size / mb:.0f} | {gguf_size / mb:.0f} | {c['seconds']:.2f} | {g['seconds']:.2f} "
        f"| {g['seconds'] / c['seconds']:.2f} | {c['peak_rss'] / mb:.0f} | {g['peak_rss'] / mb:.0f} "
        f"| {g['peak_rss'] / size:.2f} |"
    )


if __name__ == "__main__":
    main()
