"""Synthetic checkpoints (real-shaped AdaLoRA adapters, sharded llama bases) for the tests and the benchmarks."""
