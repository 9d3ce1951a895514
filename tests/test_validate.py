"""``validate``: passes on correct conversions of real PEFT-trained adapters, fails — naming level and module — on
broken ones. The vLLM level reuses the session's engine (one in-process engine per test session)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from adaconvert import to_lora
from adaconvert.cli import main
from adaconvert.errors import InvalidConfigError, SourceNotFoundError, ValidationError
from adaconvert.validation import Tolerances, validate
from adaconvert.validation.logits import DEFAULT_PROMPTS, read_prompts
from tests.helpers.adapter_edits import drop_module, first_module, misscaled, wrong_prefix
from tests.helpers.needs import require
from tests.helpers.vllm_utils import PROMPTS, user_env


def _peft_merge(base_dir, adapter_dir, out):
    """A merged checkpoint built by PEFT itself (merge_and_unload), as the reference a merge must match."""
    from tests.helpers.peft_utils import peft_model

    peft_model(base_dir, adapter_dir).merge_and_unload().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("validate")


@pytest.fixture(scope="module")
def conv_adalora(converted_llama):
    return converted_llama


@pytest.fixture(scope="module")
def lora_drop(lora_variants, work):
    """A LoRA-Drop output as issue 3 writes it: a standard PEFT LoRA directory with lora_drop.json beside it.
    (Built from a trained LoRA with patterns, so that it does not depend on the training code.)"""
    import shutil

    out = work / "lora-drop"
    shutil.copytree(lora_variants["patterns"], out)
    (out / "lora_drop.json").write_text(json.dumps({"policy": "share", "scoring": "output", "kept_layers": [0, 1]}))
    return out


@pytest.fixture(scope="module")
def conversions(conv_adalora, lora_variants, lora_drop, adalora_llama, work):
    """(original, conversion) of an AdaLoRA, a plain LoRA and a LoRA-Drop output."""
    to_lora(lora_variants["plain"], work / "plain-lora")
    to_lora(lora_drop, work / "drop-lora")
    return [
        (adalora_llama, conv_adalora),
        (lora_variants["plain"], work / "plain-lora"),
        (lora_drop, work / "drop-lora"),
    ]


@pytest.fixture(scope="module")
def merged_right(tiny_llama, adalora_llama, work):
    return _peft_merge(tiny_llama, adalora_llama, work / "merged-right")


@pytest.fixture(scope="module")
def merged_wrong(tiny_llama, adalora_llama_b, work):
    return _peft_merge(tiny_llama, adalora_llama_b, work / "merged-wrong")


@pytest.mark.vllm
def test_passes_at_every_level(tiny_llama, adalora_llama, conv_adalora, merged_right, vllm_engine, tmp_path):
    report_file = tmp_path / "report.json"
    report = validate(
        tiny_llama,
        adalora_llama,
        conv_adalora,
        merged=merged_right,
        vllm=True,
        llm=vllm_engine,
        prompts=PROMPTS,
        report=report_file,
    )
    assert report.passed, report.table()
    assert report.levels == ["weights", "logits", "vllm"]
    subjects = {(c.level, c.subject) for c in report.checks}
    label = conv_adalora.name
    assert {("weights", label), ("weights", "merged"), ("logits", label), ("logits", "merged"), ("vllm", label)} <= (
        subjects
    )
    assert all(c.passed for c in report.checks)
    saved = json.loads(report_file.read_text())
    assert saved["passed"] is True and saved["problems"] == []
    assert max(v for v in saved["modules"][label].values()) < 1e-5
    assert "PASSED" in report.table()


@pytest.mark.vllm
def test_several_pairs_at_once_adalora_lora_and_lora_drop(tiny_llama, conversions, vllm_engine):
    report = validate(tiny_llama, pairs=conversions, vllm=True, llm=vllm_engine, prompts=PROMPTS)
    assert report.passed, report.table()
    labels = [p["label"] for p in report.pairs]
    assert labels == [conv.name for _, conv in conversions]
    for label in labels:
        rows = {c.metric for c in report.checks if c.subject == label and c.level == "vllm"}
        assert rows == {"greedy agreement vs PEFT", "max |Δlogprob| vs PEFT"}
        agreement = next(c for c in report.checks if c.subject == label and c.metric == "greedy agreement vs PEFT")
        assert agreement.value == 1.0


def _misscaled(tiny_llama, adalora_llama, conv, merged_wrong, tmp_path):
    # the classic bug: scaling by lora_alpha / target_r instead of lora_alpha / init_r (init_r 8, target_r 3)
    return {"converted": misscaled(conv, tmp_path / "misscaled", 8 / 3)}, None


def _dropped(tiny_llama, adalora_llama, conv, merged_wrong, tmp_path):
    module = first_module(conv)
    return {"converted": drop_module(conv, tmp_path / "dropped", module)}, module


def _prefix(tiny_llama, adalora_llama, conv, merged_wrong, tmp_path):
    broken = wrong_prefix(conv, tmp_path / "prefix")
    return {"converted": broken}, first_module(broken)


def _wrong_merge(tiny_llama, adalora_llama, conv, merged_wrong, tmp_path):
    return {"converted": conv, "merged": merged_wrong}, None


# case, how to break it, levels that must fail, what the weights-level problem must say
FAILURES = [
    ("misscaled", _misscaled, {"weights", "logits", "vllm"}, r"relative ΔW error 1\.67"),
    ("dropped-module", _dropped, {"weights", "logits", "vllm"}, r"missing from the conversion"),
    ("wrong-prefix", _prefix, {"weights", "logits", "vllm"}, r"matches nothing in the base model.*silently ignore"),
    ("wrong-merge", _wrong_merge, {"weights", "logits"}, r"W_merged − W_base differs from the original's ΔW"),
]


@pytest.mark.vllm
@pytest.mark.parametrize(("case", "breaker", "levels", "weights_message"), FAILURES, ids=[f[0] for f in FAILURES])
def test_fails_naming_level_and_module(
    case,
    breaker,
    levels,
    weights_message,
    tiny_llama,
    adalora_llama,
    conv_adalora,
    merged_wrong,
    vllm_engine,
    tmp_path,
):
    paths, module = breaker(tiny_llama, adalora_llama, conv_adalora, merged_wrong, tmp_path)
    with pytest.raises(ValidationError, match=r"validation failed at level\(s\) weights, logits") as info:
        validate(tiny_llama, adalora_llama, vllm=True, llm=vllm_engine, prompts=PROMPTS, **paths)
    report = info.value.fields["report"]
    assert set(report.failed_levels) == levels, report.table()
    weight_problems = [p for p in report.problems if p.level == "weights"]
    assert weight_problems and all(p.module for p in weight_problems), report.table()
    assert any(__import__("re").search(weights_message, p.message) for p in weight_problems), report.table()
    if module is not None:
        assert module in {p.module for p in weight_problems}
    assert f"problem: weights [{'merged' if case == 'wrong-merge' else paths['converted'].name}]: module " in (
        report.table()
    )
    assert len(info.value.fields["problems"]) == len(report.problems)


def test_dtype_sets_the_default_tolerances(tiny_llama, adalora_llama, work):
    bf16 = work / "adalora-bf16"
    to_lora(adalora_llama, bf16, dtype="bfloat16")
    report = validate(tiny_llama, adalora_llama, bf16, prompts=PROMPTS)
    assert report.passed, report.table()
    assert report.tolerances[bf16.name] == Tolerances.for_dtypes("bfloat16").to_dict()
    worst = next(c for c in report.checks if c.metric == "max rel. ΔW error")
    assert 1e-5 < worst.value < 2e-2  # bf16 rounding is visible, and allowed
    strict = validate(
        tiny_llama, adalora_llama, bf16, prompts=PROMPTS, tolerances={"weight_rel": 1e-5}, raise_on_failure=False
    )
    assert strict.failed_levels[0] == "weights"


def test_tolerance_overrides(tiny_llama, adalora_llama, conv_adalora, tmp_path):
    broken = misscaled(conv_adalora, tmp_path / "x", 1.001)
    loose = {"weight_rel": 2e-3, "logit_abs": 1.0, "kl": 1.0, "top1": 0.0}
    assert validate(tiny_llama, adalora_llama, broken, prompts=PROMPTS, tolerances=loose).passed
    with pytest.raises(ValidationError, match=r"relative ΔW error 0\.001 > 1e-05"):
        validate(tiny_llama, adalora_llama, broken, prompts=PROMPTS)


BAD_ARGUMENTS = [
    ({}, InvalidConfigError, "nothing to validate"),
    ({"converted": "x"}, InvalidConfigError, "CONVERTED given without ORIGINAL"),
    ({"original": "a", "pairs": [("b", "c")], "converted": "d", "merged": "m"}, InvalidConfigError, "exactly one"),
    ({"original": "a"}, InvalidConfigError, "CONVERTED is missing"),
    ({"original": "a", "converted": "b", "tolerances": {"logits": 1}}, InvalidConfigError, "unknown tolerance"),
    ({"original": "a", "converted": "b", "tolerances": {"kl": -1}}, InvalidConfigError, "non-negative"),
    ({"original": "a", "converted": "b", "prompts": []}, InvalidConfigError, "at least one non-empty prompt"),
    ({"original": "a", "converted": "b", "prompts": "/no/such/file"}, SourceNotFoundError, "no such prompts file"),
    ({"original": "a", "converted": "b", "max_new_tokens": 0}, InvalidConfigError, "max_new_tokens"),
    (
        {"original": "a", "converted": "b", "quantize": "nf4", "vllm": True},
        InvalidConfigError,
        "--vllm with --quantize",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments(kwargs, error, match, tiny_llama):
    with pytest.raises(error, match=match):
        validate(tiny_llama, **kwargs)


def test_missing_base_is_an_error(adalora_llama, conv_adalora, tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"no config\.json"):
        validate(tmp_path, adalora_llama, conv_adalora)


def test_unreadable_conversion_is_the_readers_error(tiny_llama, adalora_llama, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match=r"adapter_config\.json"):
        validate(tiny_llama, adalora_llama, tmp_path / "empty", prompts=PROMPTS, raise_on_failure=False)


def test_an_adapter_to_lora_refuses_gets_the_same_error_and_exit_code(
    tiny_llama, adalora_llama, conv_adalora, lora_variants, merged_right, tmp_path, capsys
):
    """A malformed regular expression in the conversion's rank_pattern (PEFT raised re.error, a traceback): every
    adapter validate opens goes through to-lora's readers first, before any model is loaded."""
    bad = tmp_path / "bad-pattern"
    shutil.copytree(conv_adalora, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj[": 2, **config["rank_pattern"]}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert main(["to-lora", str(bad), str(tmp_path / "out"), "-q"]) == 2
    expected = capsys.readouterr().err
    assert expected.startswith(f"error: {bad / 'adapter_config.json'}: field 'rank_pattern' key")
    assert "is not a valid regular expression" in expected and len(expected.splitlines()) == 1
    for argv in (
        [str(tiny_llama), str(adalora_llama), str(bad)],
        [str(tiny_llama), str(bad), str(conv_adalora)],  # as the original
        [str(tiny_llama), "--pair", f"{lora_variants['plain']}={bad}"],
        [str(tiny_llama), str(bad), "--merged", str(merged_right)],
    ):
        assert main(["validate", *argv, "-q"]) == 2, argv
        captured = capsys.readouterr()
        assert captured.err == expected and captured.out == "", argv


@pytest.mark.vllm
def test_cli_vllm_engine_that_cannot_start_is_one_line(tiny_llama, adalora_llama, conv_adalora):
    """validate --vllm starts its own engine from a user's environment (no VLLM_* setting); one that vLLM refuses
    (a KV cache larger than the machine) is vLLM's reason in one line, exit status 9, no traceback."""
    require("vllm", purpose="the vLLM tests")
    argv = [sys.executable, "-m", "adaconvert.cli", "validate", str(tiny_llama), str(adalora_llama)]
    argv += [str(conv_adalora), "--vllm", "--kv-cache-gib", "100000", "-q"]
    run = subprocess.run(argv, capture_output=True, text=True, env=user_env(), timeout=600)
    assert run.returncode == 9, run.stderr[-3000:]
    assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.startswith(f"error: {tiny_llama}: vLLM could not start: ValueError: Available memory on node")


def test_prompts_from_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt\n")
    (tmp_path / "p.json").write_text(json.dumps(["a", "b c"]))
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "  second prompt"]
    assert read_prompts(tmp_path / "p.json") == ["a", "b c"]
    assert read_prompts(None) == list(DEFAULT_PROMPTS)
    with pytest.raises(InvalidConfigError, match="JSON list of strings"):
        read_prompts(tmp_path / "bad.json")


def test_cli_pass_fail_and_report(tiny_llama, adalora_llama, conv_adalora, lora_variants, work, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    report = tmp_path / "r.json"
    plain = work / "plain-cli"
    to_lora(lora_variants["plain"], plain)
    args = ["validate", str(tiny_llama), str(adalora_llama), str(conv_adalora), "--prompts", str(prompts), "-q"]
    code = main([*args, "--pair", f"{lora_variants['plain']}={plain}", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASSED" in out and plain.name in out
    assert json.loads(report.read_text())["passed"] is True

    broken = misscaled(conv_adalora, tmp_path / "broken", 2.0)
    code = main(["validate", str(tiny_llama), str(adalora_llama), str(broken), "--prompts", str(prompts), "-q"])
    captured = capsys.readouterr()
    assert code == 6
    assert "FAILED at level(s): weights, logits" in captured.out
    assert captured.err.startswith("error: validation failed at level(s) weights, logits: weights [broken]: module")
    assert "Traceback" not in captured.err

    loose = ["weight_rel=2", "logit_abs=100", "kl=100", "top1=0"]
    options = [x for t in loose for x in ("--tolerance", t)]
    code = main([*args[:2], "--pair", f"{adalora_llama}={broken}", *options, "--prompts", str(prompts), "-q"])
    assert code == 0, capsys.readouterr().out


CLI_USAGE_ERRORS = [
    (["validate"], "give BASE ORIGINAL CONVERTED"),
    (["validate", "base", "only-original"], "give BASE ORIGINAL CONVERTED"),
    (["validate", "base", "--pair", "no-equals-sign"], "expected ORIG=CONV"),
    (["validate", "a", "b", "--vllm-static", "x"], "--vllm-static takes"),
]


@pytest.mark.parametrize(("argv", "match"), CLI_USAGE_ERRORS)
def test_cli_usage_errors(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_cli_vllm_static(tiny_llama, adalora_llama, conv_adalora, capsys):
    assert main(["validate", "--vllm-static", str(conv_adalora), str(tiny_llama), "--max-lora-rank", "8"]) == 0
    assert capsys.readouterr().out.strip() == f"{conv_adalora}: ok"
    code = main(["validate", "--vllm-static", str(conv_adalora), "--vllm-static", str(adalora_llama), "--json"])
    captured = capsys.readouterr()
    assert code == 6
    result = json.loads(captured.out)
    assert result[str(conv_adalora)] == []
    assert {p["rule"] for p in result[str(adalora_llama)]} == {"rank-pattern", "key"}
    assert captured.err.startswith(f"error: {adalora_llama}: vLLM would not load it: [rank-pattern]")


def test_merged_only_without_a_conversion(tiny_llama, adalora_llama, merged_right, capsys):
    """What a merge (issue 4) needs: ORIGINAL against a merged checkpoint, no CONVERTED (API and CLI)."""
    report = validate(tiny_llama, adalora_llama, merged=merged_right, prompts=PROMPTS)
    assert report.passed, report.table()
    assert {c.subject for c in report.checks} == {adalora_llama.name, "merged"}
    argv = ["validate", str(tiny_llama), str(adalora_llama), "--merged", str(merged_right), "--json", "-q"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is True and result["pairs"][0]["converted"] is None


def test_gpt2_conv1d_adapter_and_merge(tiny_gpt2, adalora_gpt2, tmp_path):
    """fan_in_fan_out: ΔW is stored transposed in Conv1D weights; weights, logits and merge still agree."""
    conv = tmp_path / "gpt2-lora"
    to_lora(adalora_gpt2, conv)
    merged = _peft_merge(tiny_gpt2, adalora_gpt2, tmp_path / "gpt2-merged")
    report = validate(tiny_gpt2, adalora_gpt2, conv, merged=merged, prompts=PROMPTS)
    assert report.passed, report.table()
    worst = next(c for c in report.checks if c.subject == "merged" and c.metric == "merged ΔW error / allowance")
    assert worst.value < 1


def test_merged_check_finds_prefixed_base_tensors(tiny_llama, adalora_llama, tmp_path):
    """A base saved without the ``model.`` wrapper (keys ``layers.0…``): merge matches the adapter's modules to those
    tensors, and the merged check must find them by the same rule instead of reporting a correct merge as wrong."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adaconvert import merge

    base = tmp_path / "unwrapped-base"
    shutil.copytree(tiny_llama, base)
    tensors = load_file(str(base / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(base / "model.safetensors"))
    merge(base, [adalora_llama], tmp_path / "merged")
    report = validate(base, adalora_llama, merged=tmp_path / "merged", prompts=PROMPTS)
    assert report.passed, report.table()
    worst = next(c for c in report.checks if c.subject == "merged" and c.metric == "merged ΔW error / allowance")
    assert worst.detail and worst.value < 1  # the adapted modules were found and compared


def test_report_never_replaces_an_existing_file_without_overwrite(tiny_llama, adalora_llama, conv_adalora, tmp_path):
    """--report is an output: an existing file is refused before any model is loaded, and kept."""
    from adaconvert.errors import OutputExistsError

    report = tmp_path / "v.json"
    report.write_text("mine")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        validate(tiny_llama, adalora_llama, conv_adalora, prompts=PROMPTS, report=report)
    assert report.read_text() == "mine"
    validate(tiny_llama, adalora_llama, conv_adalora, prompts=PROMPTS, report=report, overwrite=True)
    assert json.loads(report.read_text())["passed"]
