"""GPU check: train LoRA, AdaLoRA and LoRA-Drop for a fixed number of steps on a 336M-parameter llama built from
a config (no download), in bf16, and print step time, tokens/s and peak GPU memory per method in one table.

One command, a few minutes on one GPU:

    python tools/gpu_check.py            # GPU: size "gpu" (24 layers, hidden 1024, 8 × 512 tokens), 30 steps
    python tools/gpu_check.py --size tiny --steps 8   # the same code on CPU, small (what CI-like machines run)

Without a GPU it runs unchanged on CPU with the ``small`` size (fp32). Needs only torch, transformers, peft and
adaconvert (no vLLM). The measurement itself is ``tools/bench_train.py``'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import SIZES, run_all, table  # tools/ is not a package: imported by path


def environment() -> str:
    import peft
    import torch
    import transformers

    from adaconvert.training.trainer import resolve_precision

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"device: {device} (precision {resolve_precision('auto')}); "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpu on a GPU, small on CPU")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method (default 30)")
    args = parser.parse_args(argv)
    size = args.size or ("gpu" if torch.cuda.is_available() else "small")
    print(environment(), flush=True)
    started = time.perf_counter()
    rows, info = run_all(size, args.steps)
    print(table(rows, info))
    print(f"\ntotal {time.perf_counter() - started:.0f} s (model build {info['setup_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
