"""Tiny models, tokenizer and data for the demo, the tests and the benchmarks: built on the fly, nothing downloaded."""
