"""`adaconvert eval` of 4 converted adapters on 256 prompts: one vLLM engine (every adapter batched together)
against four separate PEFT passes (`--engine hf`: the base loaded once, each adapter attached and run alone,
which only favours PEFT over loading the base four times).

Each side runs in its own process (peak RSS is that process's own): loss on 256 texts and greedy generation of up
to 32 tokens from 256 prompts, for the base and each adapter. Throughput = subjects × (scored tokens + generated
prompts) / wall time; the ratio is vLLM's over PEFT's, with and without vLLM's engine start-up.

    python tools/bench_eval.py [--prompts 256] [--adapters 4] [--layers 4] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(root: Path, *, adapters: int, prompts: int, layers: int, hidden: int) -> tuple[Path, list[Path], Path]:
    """A tiny llama, ``adapters`` random LoRAs converted with to-lora, and ``prompts`` question/answer rows."""
    import torch
    from peft import LoraConfig, get_peft_model

    from adaconvert import to_lora
    from adaconvert.demo.tiny import SENTENCES, build_tiny_model

    base = root / "base"
    build_tiny_model(base, "llama", layers=layers, hidden=hidden)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    converted = []
    for i in range(adapters):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base)),
            LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"),
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: give each adapter a real effect
                torch.nn.init.normal_(param, std=0.05)
        model.save_pretrained(str(root / f"lora-{i}"))
        converted.append(root / f"lora-{i}-converted")
        to_lora(root / f"lora-{i}", converted[-1])
    data = root / "qa.jsonl"
    rows = [
        f"{SENTENCES[i % len(SENTENCES)]} answer : {SENTENCES[(i * 3 + 1) % len(SENTENCES)]}" for i in range(prompts)
    ]
    data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return base, converted, data


def run_one(engine: str, base: str, adapters: list[str], data: str) -> None:
    """In a child process: one eval, then its timings and peak RSS as JSON on stdout."""
    from adaconvert.evaluation import evaluate
    from adaconvert.process import peak_rss_bytes

    started = time.perf_counter()
    report = evaluate(base, adapters, data=data, split_on="answer :", engine=engine, max_new_tokens=32, progress=False)
    wall = time.perf_counter() - started
    generated = sum(len(p.split()) for row in report.rows for p in row.predictions)
    print(json.dumps({"wall": wall, "engine_seconds": report.seconds, "rss": peak_rss_bytes(),
                      "subjects": len(report.rows), "tokens": report.rows[0].tokens, "generated_words": generated,
                      "loss": [r.loss for r in report.rows]}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, base, data, *adapters = args.child
        run_one(engine, base, adapters, data)
        return
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        base, adapters, data = build(
            Path(tmp), adapters=args.adapters, prompts=args.prompts, layers=args.layers, hidden=args.hidden
        )
        results = {}
        for engine in ("vllm", "hf"):
            command = [sys.executable, __file__, "--child", engine, str(base), str(data), *map(str, adapters)]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{engine} run failed")
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    vllm, hf = results["vllm"], results["hf"]
    print(
        f"{args.adapters} converted LoRA adapters (r 8, every projection) + the base on a {args.layers}-layer, "
        f"hidden-{args.hidden} llama; {args.prompts} rows: loss on each text ({hf['tokens']} tokens) and greedy "
        "generation of ≤ 32 tokens from each prompt, for every subject.\n"
    )
    print("| engine | process wall (s) | evaluate() (s) | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for name, label in (("vllm", "vLLM, one engine, all adapters batched"), ("hf", "PEFT, one adapter at a time")):
        r = results[name]
        print(f"| {label} | {r['wall']:.1f} | {r['engine_seconds']:.1f} | {r['rss'] / 2**20:.0f} |")
    print(
        f"\nThroughput ratio vLLM / PEFT: {hf['engine_seconds'] / vllm['engine_seconds']:.2f}× on evaluate() "
        f"(models loaded, adapters converted, vLLM's engine started, every subject scored and decoded), "
        f"{hf['wall'] / vllm['wall']:.2f}× on the whole process (goal ≥ 3×). Max |Δloss| between the engines: "
        f"{max(abs(a - b) for a, b in zip(vllm['loss'], hf['loss'], strict=True)):.2e} nats."
    )


if __name__ == "__main__":
    main()
