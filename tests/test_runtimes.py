"""The portability check's predictions, against the real runtimes installed here (PEFT, vLLM, mlx-lm).

vLLM's side is in ``test_vllm_to_lora.py`` (compact with ranks below R and uniform served, raw AdaLoRA refused)
and ``test_vllm_static.py`` (the rules of the static check, which is the vLLM verdict); mlx-lm's exact verdict on
``to-mlx`` output in ``test_mlx.py``; llama.cpp's factors are asserted against real llama.cpp in ``test_gguf.py``.
SGLang and LoRAX/TGI are not installable here: their rules follow the source cited in
``adaconvert/compat/runtimes.py``, and the tests below pin what those rules say about each layout.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import adaconvert
from adaconvert.cli import main
from adaconvert.compat.runtimes import RUNTIMES, check_runtimes, llama_cpp_scale_factors, read_facts
from adaconvert.errors import InvalidConfigError
from tests.helpers.adapter_edits import drop_module, edited_copy
from tests.helpers.peft_utils import adalora_config, peft_model, train_peft


@pytest.fixture(scope="module")
def layouts(adalora_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    adaconvert.to_lora(adalora_llama, root / "compact")
    adaconvert.to_lora(adalora_llama, root / "uniform", layout="uniform")
    return {"compact": root / "compact", "uniform": root / "uniform"}


def statuses(adapter_dir) -> dict[str, str]:
    return {k: v.status for k, v in check_runtimes(adapter_dir).items()}


def test_every_runtime_cites_its_source():
    assert set(RUNTIMES) == {"peft", "vllm", "llama.cpp", "sglang", "lorax", "mlx-lm"}
    for runtime in RUNTIMES.values():
        assert ".py" in runtime.source or ".h" in runtime.source
        assert runtime.check.__doc__, f"{runtime.title}: the rule must say which runtime code it follows"


def test_compact_and_uniform(layouts):
    compact = statuses(layouts["compact"])
    # LoRAX depends on where the pruning fell (a kind missing in one layer is dropped): see test_lorax_rules
    assert {k: v for k, v in compact.items() if k != "lorax"} == {
        "peft": "exact",
        "vllm": "exact",
        "llama.cpp": "wrong-scale",
        "sglang": "refused",
        "mlx-lm": "refused",
    }
    assert statuses(layouts["uniform"]) == {
        "peft": "exact",
        "vllm": "exact",
        "llama.cpp": "exact",
        "sglang": "exact",
        "lorax": "exact",
        "mlx-lm": "refused",
    }


def test_lorax_rules(layouts, tmp_path):
    """LoraWeights.load: a kind missing in one layer is applied in none; ranks padding to different sizes
    (≤ 8 → 8, else the next multiple of 16) cannot be stacked."""
    module = "model.layers.1.self_attn.q_proj"
    missing = drop_module(layouts["uniform"], tmp_path / "missing", module)
    verdict = check_runtimes(missing)["lorax"]
    assert verdict.status == "wrong-scale"
    assert verdict.factors == {"model.layers.0.self_attn.q_proj": 0.0}

    def widen(tensors):
        key = f"base_model.model.{module}.lora_"
        a, b = tensors[key + "A.weight"], tensors[key + "B.weight"]
        extra = 12 - a.shape[0]
        return {
            **tensors,
            key + "A.weight": torch.cat([a, a.new_zeros(extra, a.shape[1])]),
            key + "B.weight": torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
        }

    wide = edited_copy(layouts["uniform"], tmp_path / "wide", tensors=widen)
    verdict = check_runtimes(wide)["lorax"]
    assert verdict.status == "refused" and "pad to [8, 16]" in verdict.reason


def test_llama_cpp_factors_are_r_over_rank(layouts):
    """What llama.cpp's own converter + get_scale do to each module: lora_alpha / r_m with lora_alpha = R, where
    PEFT applies 1. ``test_gguf.py`` checks these factors against real llama.cpp."""
    config = json.loads((layouts["compact"] / "adapter_config.json").read_text())
    expected = {m: config["lora_alpha"] / r for m, r in config["rank_pattern"].items()}
    assert llama_cpp_scale_factors(read_facts(layouts["compact"])) == pytest.approx(expected, rel=1e-12)
    verdict = check_runtimes(layouts["compact"])["llama.cpp"]
    assert verdict.factors == pytest.approx({m: f for m, f in expected.items() if f != 1}, rel=1e-12)
    assert verdict.factor_range[1] == max(expected.values()) > 1
    assert set(llama_cpp_scale_factors(read_facts(layouts["uniform"])).values()) == {1.0}


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
def test_intended_scale_is_what_peft_applies(variant, lora_variants, tiny_llama):
    """The reference scale of every rule, read from the config alone, against PEFT's own loaded modules."""
    facts = read_facts(lora_variants[variant])
    model = peft_model(tiny_llama, lora_variants[variant])
    applied = {
        name.removeprefix("base_model.model."): module.scaling["default"]
        for name, module in model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }
    assert applied.keys() == facts.modules.keys()
    assert {m: facts.intended_scale(m) for m in applied} == pytest.approx(applied, rel=1e-12)
    assert check_runtimes(lora_variants[variant])["peft"].status == "exact"


def test_other_runtimes_on_plain_rslora_and_patterns(lora_variants):
    plain, rslora, patterns = (check_runtimes(lora_variants[v]) for v in ("plain", "rslora", "patterns"))
    assert {k: v.status for k, v in plain.items() if k != "mlx-lm"} == dict.fromkeys(
        ("peft", "vllm", "llama.cpp", "sglang", "lorax"), "exact"
    )
    # rsLoRA: alpha / √r in PEFT, vLLM and LoRAX; alpha / r in llama.cpp and SGLang, 1 / √r of the intended
    r = json.loads((lora_variants["rslora"] / "adapter_config.json").read_text())["r"]
    for runtime in ("llama.cpp", "sglang"):
        assert rslora[runtime].status == "wrong-scale"
        factors = rslora[runtime].factors
        assert factors == pytest.approx(dict.fromkeys(factors, 1 / math.sqrt(r)), rel=1e-12)
        assert len(factors) == len(read_facts(lora_variants["rslora"]).modules)
    assert rslora["lorax"].status == rslora["vllm"].status == "exact"
    # patterns: ranks other than r refuse SGLang; alpha_pattern is not read by llama.cpp nor LoRAX
    assert patterns["sglang"].status == "refused"
    assert patterns["llama.cpp"].status == patterns["lorax"].status == "wrong-scale"
    assert patterns["vllm"].status == "exact"


def test_config_rank_that_disagrees_with_the_tensors(lora_variants, tiny_llama, tmp_path):
    """Predicted refused for PEFT; PEFT's own load indeed fails."""
    broken = edited_copy(
        lora_variants["plain"], tmp_path / "broken", config=lambda c: {**c, "rank_pattern": {"q_proj": 2}}
    )
    verdict = check_runtimes(broken)["peft"]
    assert verdict.status == "refused" and "q_proj" in verdict.reason
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_model(tiny_llama, broken)


def test_adalora_with_non_positive_alpha_in_peft(tiny_llama, tmp_path):
    """lora_alpha <= 0: predicted wrong-scale by kept / init_r per module; PEFT's reload against the trained model."""
    cfg = adalora_config("llama", total_step=30, lora_alpha=0)
    saved, trained = train_peft(tiny_llama, tmp_path / "ada", cfg, steps=30, seed=3, adalora=True, keep=True)
    verdict = check_runtimes(saved)["peft"]
    assert verdict.status == "wrong-scale"
    reloaded = dict(peft_model(tiny_llama, saved).named_modules())
    for name, module in trained.named_modules():
        if not (hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})):
            continue
        with torch.no_grad():
            before = module.get_delta_weight("default")
            after = reloaded[name].get_delta_weight("default")
        if before.norm() == 0:
            continue
        ratio = float(after.norm() / before.norm())
        # a ratio of two norms of the same matrix times a scalar: float32 rounding only
        assert ratio == pytest.approx(verdict.factors.get(name.removeprefix("base_model.model."), 1.0), rel=1e-5)


def test_mlx_lm_refuses_a_peft_directory(layouts, tiny_llama):
    """Predicted refused; mlx-lm's own loader indeed cannot read a PEFT directory."""
    from tests.helpers.needs import require_mlx_lm

    require_mlx_lm()
    from mlx_lm.tuner.utils import load_adapters

    assert check_runtimes(layouts["uniform"])["mlx-lm"].status == "refused"
    with pytest.raises((AttributeError, KeyError, ValueError, FileNotFoundError)):
        load_adapters(object(), str(layouts["uniform"]))


def test_raw_adalora_and_unknown_types(adalora_llama, tmp_path):
    verdicts = check_runtimes(adalora_llama)
    assert verdicts["peft"].status == "exact"
    assert {k: v.status for k, v in verdicts.items() if k != "peft"} == dict.fromkeys(
        ("vllm", "llama.cpp", "sglang", "lorax", "mlx-lm"), "refused"
    )
    assert "rank_pattern" in verdicts["vllm"].reason  # the static vLLM check's own first problem
    other = edited_copy(adalora_llama, tmp_path / "ia3", config=lambda c: {**c, "peft_type": "IA3"})
    with pytest.raises(InvalidConfigError, match="reads LORA and ADALORA adapters"):
        check_runtimes(other)
    with pytest.raises(InvalidConfigError, match="unknown runtime"):
        check_runtimes(adalora_llama, runtimes=["tgi"])


def test_inspect_runtimes_text_and_json(layouts, capsys):
    assert main(["inspect", str(layouts["compact"]), "--runtimes"]) == 0
    out = capsys.readouterr().out
    assert "runtimes:" in out and "SGLang" in out
    assert re.search(r"llama\.cpp / Ollama +wrong-scale on \d+ module\(s\) \(× [\d.]+–[\d.]+\)", out)
    assert main(["inspect", str(layouts["uniform"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtimes"]["sglang"]["status"] == "exact"
    assert report["runtimes"]["llama.cpp"]["source"].startswith("convert_lora_to_gguf.py")


def test_validate_reports_the_runtimes(adalora_llama, layouts, tiny_llama):
    from adaconvert.validation import validate

    result = validate(tiny_llama, adalora_llama, layouts["compact"], progress=False)
    verdicts = next(iter(result.runtimes.values()))
    assert verdicts["vllm"]["status"] == "exact" and verdicts["llama.cpp"]["status"] == "wrong-scale"
    assert "runtimes" in result.to_dict() and "wrong-scale in llama.cpp" in result.table()
