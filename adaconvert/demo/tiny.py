"""Build small random causal LMs and a word-level tokenizer on the fly (no download).

Weights use ``initializer_range=0.1`` so that logits are not flat and adapter effects are visible; head_dim is
32 because vLLM's CPU attention rejects some head sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a rank varying adapter puts its budget where it matters",
    "low rank updates are folded into the base weights",
    "every module keeps the rank it needs and no more",
    "the model reads a prompt and writes the next token",
    "adapters are served side by side in one engine",
    "pruned singular values leave zeros behind",
    "layers with nothing left are removed from the checkpoint",
]

ARCHITECTURES = ("llama", "gpt2", "qwen2")


def build_tokenizer(directory: str | Path, sentences: list[str] | None = None, *, arch: str = "llama"):
    """Train a tokenizer on ``sentences`` and save it as a fast HF tokenizer in ``directory``.

    Word-level for llama and gpt2. For qwen2 a byte-level BPE with Qwen2's own pre-tokenizer: transformers 5 always
    loads a qwen2 directory's tokenizer as ``Qwen2Tokenizer``, which rebuilds the pipeline from the saved vocab and
    merges (byte-level BPE), and so turns a word-level vocab into one that yields no tokens. Built this way,
    ``AutoTokenizer`` gives the same ids as the saved ``tokenizer.json`` for every architecture.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0-3: pad, bos and eos ids in tiny_config
    if arch == "qwen2":
        from tokenizers import Regex, decoders, normalizers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=specials, show_progress=False)
    tok.train_from_iterator(sentences or SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))
    return fast


def tiny_config(arch: str, *, vocab_size: int, layers: int = 2, hidden: int = 64):
    """A transformers config for a small model of ``arch`` (``llama``: GQA untied; ``qwen2``: tied embeddings,
    q/k/v biases; ``gpt2``: Conv1D layers)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = {
        "vocab_size": vocab_size,
        "initializer_range": 0.1,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
    }
    decoder = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 256,
        **common,
    }
    if arch == "llama":
        return LlamaConfig(**decoder, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**decoder, tie_word_embeddings=True)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=hidden // 32, n_positions=256, **common)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def build_tiny_model(
    directory: str | Path,
    arch: str = "llama",
    *,
    layers: int = 2,
    hidden: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    sentences: list[str] | None = None,
):
    """Create a random ``arch`` model with a trained tokenizer and save both to ``directory``; return the model.

    ``sentences`` (default :data:`SENTENCES`) are the texts the word-level tokenizer is trained on."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer(directory, sentences, arch=arch)
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=len(tokenizer), layers=layers, hidden=hidden)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return model
