"""The static vLLM check: one broken adapter per rule, each checked statically and against a real vLLM engine."""

from __future__ import annotations

import itertools
import json

import pytest

from adaconvert import to_lora
from adaconvert.compat.vllm import RULES, check_vllm_compat, require_vllm_compat
from adaconvert.errors import InvalidConfigError, RankLimitError
from tests.helpers.adapter_edits import (
    PREFIX,
    edited_copy,
    first_module,
    padded_rank,
    rename_module,
    set_config,
    wrong_prefix,
)

_ids = itertools.count(2_000_001)
IGNORED, WRONG_SCALE = "ignored", "wrong-scale"


@pytest.fixture(scope="module")
def converted(converted_llama):
    """The safe export layout of a trained AdaLoRA: what every case starts from (read-only)."""
    return converted_llama


def _smallest_module(src) -> str:
    ranks = json.loads((src / "adapter_config.json").read_text())["rank_pattern"]
    return min(ranks, key=ranks.get)


def _drop_config_field(src, dst):
    return edited_copy(src, dst, config=lambda c: {k: v for k, v in c.items() if k != "target_modules"})


def _raw_mask(src, dst):
    def config(cfg):
        cfg["rank_pattern"][first_module(src)] = [True, False, True, True]
        return cfg

    return edited_copy(src, dst, config=config)


def _bad_regex(src, dst):
    """A rank_pattern key that is not a regular expression, first in the pattern (so every module meets it)."""

    def config(cfg):
        cfg["rank_pattern"] = {"layers.0.(q_proj": 1, **cfg["rank_pattern"]}
        return cfg

    return edited_copy(src, dst, config=config)


def _extra_key(src, dst):
    def tensors(t):
        a_key = next(k for k in t if k.endswith("lora_A.weight"))
        return {**t, a_key.replace("lora_A.weight", "lora_E"): t[a_key][:, :1].clone()}

    return edited_copy(src, dst, tensors=tensors)


def _unsupported_module(src, dst):
    return rename_module(src, dst, "model.layers.0.mlp.down_proj", "model.layers.0.mlp.foo_proj")


def _no_weights(src, dst):
    out = edited_copy(src, dst)
    (out / "adapter_model.safetensors").unlink()
    return out


def _rank_mismatch(src, dst):
    """rank_pattern says one more than the tensors hold for the rank-1 module (alpha_pattern unchanged)."""
    module = _smallest_module(src)

    def config(cfg):
        cfg["rank_pattern"][module] += 1
        return cfg

    return edited_copy(src, dst, config=config)


# (case, edit, the rule the static check must name, what real vLLM does: a regex of its error, or IGNORED /
# WRONG_SCALE for the adapters it loads without a word)
CASES = [
    ("config-field", _drop_config_field, "config-field", r"Missing required configuration fields"),
    ("rank", lambda s, d: edited_copy(s, d, config=set_config(r=0)), "rank", r"rank `r` must be a positive integer"),
    ("rank-pattern", _raw_mask, "rank-pattern", r"in `rank_pattern` must be a positive integer"),
    ("pattern-regex", _bad_regex, "rank-pattern", r"missing \) at position"),
    ("max-lora-rank", lambda s, d: padded_rank(s, d, 32), "max-lora-rank", r"LoRA rank 32 is greater than max_lora"),
    ("bias", lambda s, d: edited_copy(s, d, config=set_config(bias="all")), "bias", r"Adapter bias is not supported"),
    ("dora", lambda s, d: edited_copy(s, d, config=set_config(use_dora=True)), "feature", r"not yet support DoRA"),
    ("lora-bias", lambda s, d: edited_copy(s, d, config=set_config(lora_bias=True)), "feature", r"LoRA bias"),
    (
        "init",
        lambda s, d: edited_copy(s, d, config=set_config(init_lora_weights="pissa")),
        "init",
        r"does not support init_lora_weights='pissa'",
    ),
    (
        "modules-to-save",
        lambda s, d: edited_copy(s, d, config=set_config(modules_to_save=["lm_head"])),
        "modules-to-save",
        r"only supports modules_to_save",
    ),
    ("key", _extra_key, "key", r"lora_E is unsupported LoRA weight"),
    ("unsupported-module", _unsupported_module, "unsupported-module", r"expected target modules in .* but received"),
    ("files", _no_weights, "files", r"doesn't contain tensors"),
    ("unknown-module", wrong_prefix, "unknown-module", IGNORED),
    ("shape", _rank_mismatch, "shape", WRONG_SCALE),
]


def test_every_rule_has_a_case():
    assert {rule for _, _, rule, _ in CASES} == set(RULES)


def test_correct_conversion_passes(converted, tiny_llama):
    assert check_vllm_compat(converted, max_lora_rank=8, base_config=tiny_llama) == []
    require_vllm_compat(converted, max_lora_rank=8, base_config=tiny_llama)


@pytest.mark.parametrize(("case", "edit", "rule", "vllm_does"), CASES, ids=[c[0] for c in CASES])
def test_static_check_names_the_rule(case, edit, rule, vllm_does, converted, tiny_llama, tmp_path):
    broken = edit(converted, tmp_path / case)
    problems = check_vllm_compat(broken, max_lora_rank=16, base_config=tiny_llama)
    assert {p.rule for p in problems} == {rule}, [str(p) for p in problems]
    assert all(str(p).startswith(f"[{rule}]") for p in problems)


@pytest.mark.vllm
@pytest.mark.parametrize(("case", "edit", "rule", "vllm_does"), CASES, ids=[c[0] for c in CASES])
def test_static_check_agrees_with_vllm(case, edit, rule, vllm_does, converted, tiny_llama, vllm_engine, tmp_path):
    """vLLM (engine: max_lora_rank 16) refuses each adapter with the message the rule names, or loads it and
    serves wrong outputs without a word: base outputs (``unknown-module``) or a mis-scaled module (``shape``)."""
    from vllm.lora.request import LoRARequest

    from tests.helpers.vllm_utils import greedy, prompt_token_ids

    broken = edit(converted, tmp_path / case)
    assert check_vllm_compat(broken, max_lora_rank=16, base_config=tiny_llama)
    if vllm_does not in (IGNORED, WRONG_SCALE):
        with pytest.raises(Exception, match=vllm_does):
            vllm_engine.llm_engine.add_lora(LoRARequest(case, next(_ids), str(broken)))
        return
    prompts = prompt_token_ids(tiny_llama)
    served = greedy(vllm_engine, prompts, broken, name=case)
    right = greedy(vllm_engine, prompts, converted, name="right")
    base = greedy(vllm_engine, prompts)
    if vllm_does == IGNORED:
        assert [tokens for tokens, _ in served] == [tokens for tokens, _ in base]
        assert [tokens for tokens, _ in right] != [tokens for tokens, _ in base]
    else:
        pairs = [(a, b) for (_, la), (_, lb) in zip(served, right, strict=True) for a, b in zip(la, lb, strict=True)]
        worst = max(abs(a - b) for a, b in pairs)
        assert worst > 1e-3, "vLLM should apply the config's (wrong) rank to the scaling"


@pytest.mark.vllm
def test_correct_conversion_loads_in_vllm(converted, vllm_engine):
    from vllm.lora.request import LoRARequest

    request = LoRARequest("ok", next(_ids), str(converted))
    assert vllm_engine.llm_engine.add_lora(request)
    vllm_engine.llm_engine.remove_lora(request.lora_int_id)


def test_without_base_config_module_names_are_not_checked(converted, tmp_path):
    broken = wrong_prefix(converted, tmp_path / "prefix")
    assert check_vllm_compat(broken) == []


def test_rank_above_every_bucket_without_max_lora_rank(converted, tmp_path):
    problems = check_vllm_compat(padded_rank(converted, tmp_path / "big", 600))
    assert {p.rule for p in problems} == {"max-lora-rank"}
    assert "greater than max_lora_rank 512" in str(problems[0])


def test_a_weights_file_rewritten_in_place_is_read_again(converted, tmp_path):
    """The check remembers each weights file's header per version of the file (inode, size, mtime): one rewritten
    in place, as ``save_file`` over it does, is read again."""
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "a"
    shutil.copytree(converted, adapter)
    assert check_vllm_compat(adapter) == []
    big = padded_rank(converted, tmp_path / "big", 600)
    save_file(load_file(big / "adapter_model.safetensors"), adapter / "adapter_model.safetensors")  # same inode
    (adapter / "adapter_config.json").write_text((big / "adapter_config.json").read_text())
    assert {p.rule for p in check_vllm_compat(adapter)} == {"max-lora-rank"}


REQUIRE_ERRORS = [
    (lambda s, d: padded_rank(s, d, 32), RankLimitError, r"would not load in vLLM: \[max-lora-rank\]"),
    (
        lambda s, d: edited_copy(s, d, config=set_config(bias="all", use_dora=True)),
        InvalidConfigError,
        r"\[bias\].*; \[feature\] DoRA",
    ),
]


@pytest.mark.parametrize(("edit", "error", "match"), REQUIRE_ERRORS)
def test_require_raises_once_with_every_problem(edit, error, match, converted, tmp_path):
    broken = edit(converted, tmp_path / "broken")
    with pytest.raises(error, match=match) as info:
        require_vllm_compat(broken, max_lora_rank=16)
    assert str(broken) in str(info.value)
    assert info.value.fields["problems"]


def test_invalid_bucket_is_an_error(converted):
    with pytest.raises(InvalidConfigError, match="must be one of 1, 8, 16"):
        check_vllm_compat(converted, max_lora_rank=24)


def test_to_lora_runs_the_check_before_renaming(adalora_llama, tmp_path, monkeypatch):
    """A writer that produced something vLLM rejects must not leave an output behind."""
    import adaconvert.conversion.peft_lora as convert

    real_writer = convert.write_peft_lora

    def writer_with_bias(adapter, directory, **options):
        real_writer(adapter, directory, **options)
        config = directory / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "bias": "lora_only"}))

    monkeypatch.setattr(convert, "write_peft_lora", writer_with_bias)
    with pytest.raises(InvalidConfigError, match=r"the conversion would not load in vLLM: \[bias\]"):
        to_lora(adalora_llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.vllm
def test_keys_without_peft_prefix_serve_the_same(converted, tiny_llama, vllm_engine, tmp_path):
    """vLLM also accepts keys without ``base_model.model.`` and takes their module names as they are: the static
    check passes them, and vLLM serves exactly what the prefixed adapter serves."""
    from tests.helpers.vllm_utils import greedy, prompt_token_ids

    def strip(tensors):
        return {k.removeprefix(PREFIX): v for k, v in tensors.items()}

    bare = edited_copy(converted, tmp_path / "bare", tensors=strip)
    assert check_vllm_compat(bare, base_config=tiny_llama) == []
    prompts = prompt_token_ids(tiny_llama)
    assert greedy(vllm_engine, prompts, bare, name="bare") == greedy(vllm_engine, prompts, converted, name="full")
