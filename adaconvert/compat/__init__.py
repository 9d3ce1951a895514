"""Every runtime rule: how PEFT, vLLM, llama.cpp, SGLang, LoRAX/TGI and mlx-lm read and scale an adapter.

``vllm``: vLLM's load-time checks (the static check); ``runtimes``: the portability verdicts per runtime.
"""
