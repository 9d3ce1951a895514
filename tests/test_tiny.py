"""The tiny test bases load as-is in transformers: AutoTokenizer gives the saved tokenizer's ids for every
architecture the tests build (transformers 5 replaces a qwen2 directory's tokenizer class with Qwen2Tokenizer)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from adaconvert.demo.tiny import SENTENCES


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_auto_tokenizer_gives_the_saved_ids(arch, request):
    base = request.getfixturevalue(f"tiny_{arch}")
    saved = Tokenizer.from_file(str(base / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(base))
    for text in [*SENTENCES, "the lazy fox writes a token"]:
        ids = auto(text)["input_ids"]
        assert ids and ids == saved.encode(text).ids, (type(auto).__name__, text)
        assert auto.decode(ids).strip() == text
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 2, 3)
