"""PEFT's pattern-key rule, as adaconvert evaluates it, agrees with PEFT's own function."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key as peft_get_pattern_key

from adaconvert.scaling import LoraPatterns, get_pattern_key

# plain keys (module names) are matched without re: newlines, where re's "$" and "." have their quirks, included
names = st.text(alphabet="ab1._\n", min_size=1, max_size=12)
plain_keys = st.text(alphabet="ab1._-\n", min_size=0, max_size=8)
regex_keys = st.sampled_from([r"a\.b", ".*1", r"b|a", r"(a|b)\.1", "a+", r"layers\.1\.a"])


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(st.one_of(plain_keys, regex_keys), min_size=1, max_size=5, unique=True), name=names)
def test_pattern_key_matches_peft(keys, name):
    ours = get_pattern_key(keys, name)
    # PEFT returns the name itself when no key matches
    assert (ours if ours is not None else name) == peft_get_pattern_key(keys, name)


def test_first_key_wins_and_rank_alpha_lookup():
    patterns = LoraPatterns(r=8, lora_alpha=16, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 3})
    assert patterns.rank_and_alpha("model.layers.1.self_attn.q_proj") == (2, 16)
    assert patterns.rank_and_alpha("model.layers.2.self_attn.q_proj") == (3, 16)
    assert patterns.rank_and_alpha("model.layers.2.self_attn.k_proj") == (8, 16)
    # a dot in a plain key matches any character, as in PEFT
    assert get_pattern_key(["layers.1.q"], "model.layers72xq") is None
    assert get_pattern_key(["layers.1.q"], "model.layersX1Yq") == "layers.1.q"
    assert get_pattern_key(["layers.1.q"], "model.layers.1.q\n") == "layers.1.q"  # re's "$" before a final newline
    assert get_pattern_key(["layers.1.q"], "model.layers\n1.q") is None
