"""`adaconvert eval` with the transformers + PEFT engine: the numbers are PEFT's own (loss of a direct forward pass,
parameter counts), generation metrics come from rouge-score, and bad input ends in one line and an exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaconvert.cli.main import main
from adaconvert.demo.tiny import SENTENCES
from adaconvert.evaluation import evaluate
from adaconvert.training.data import CausalCollator, tokenize
from tests.helpers.peft_utils import load_base

# our loss sums float32 cross-entropies batch by batch into a Python float; PEFT's forward pass averages all tokens
# of one padded batch in float32: the same terms summed in another order, relative difference ~1e-7
LOSS_REL_TOL = 1e-5


def write_qa(path, rows=SENTENCES):
    """Each sentence as 'first three words answer : the rest' (a prompt/reference pair through --split-on)."""
    lines = [json.dumps({"text": " ".join(s.split()[:3]) + " answer : " + " ".join(s.split()[3:])}) for s in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return write_qa(tmp_path_factory.mktemp("eval-data") / "qa.jsonl")


@pytest.fixture(scope="module")
def general(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-general") / "general.txt"
    path.write_text("\n".join(reversed(SENTENCES)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_report(tiny_llama, adalora_llama, converted_llama, lora_variants, qa, general):
    adapters = [adalora_llama, converted_llama, lora_variants["plain"], lora_variants["patterns"]]
    return evaluate(
        tiny_llama,
        adapters,
        data=qa,
        split_on="answer :",
        reference_data=general,
        engine="hf",
        max_new_tokens=6,
        progress=False,
    )


@torch.no_grad()
def peft_loss(base, adapter, texts) -> float:
    """PEFT's forward pass over every example in one padded batch, scored by transformers' own causal-LM loss
    (padding labelled -100). The labels are not passed to the model: PEFT's AdaLoRA would then add its training-only
    orthogonality penalty (and fails to, on an adapter loaded for inference)."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.loss.loss_utils import ForCausalLMLoss

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    examples = tokenize(texts, tokenizer, max_length=512).examples
    batch = CausalCollator(tokenizer.pad_token_id)([{"input_ids": e} for e in examples])
    model = load_base(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(ForCausalLMLoss(logits, batch["labels"], vocab_size=logits.shape[-1]))


def test_eval_loss_equals_a_direct_peft_forward_pass(hf_report, tiny_llama, adalora_llama, lora_variants, qa):
    texts = [json.loads(line)["text"] for line in qa.read_text().splitlines()]
    for label, adapter in (("base", None), (adalora_llama.name, adalora_llama), ("plain", lora_variants["plain"])):
        ours = hf_report.row(label).loss
        assert ours == pytest.approx(peft_loss(tiny_llama, adapter, texts), rel=LOSS_REL_TOL)
    # the adapters matter on these texts, so the comparison means something
    assert hf_report.row(adalora_llama.name).loss < hf_report.row("base").loss - 0.1


def test_parameter_counts_equal_peft_own_count(hf_report, tiny_llama, adalora_llama, converted_llama, lora_variants):
    from peft import PeftModel

    for adapter in (adalora_llama, converted_llama, lora_variants["plain"], lora_variants["patterns"]):
        model = PeftModel.from_pretrained(load_base(tiny_llama), str(adapter), is_trainable=True)
        trainable, _ = model.get_nb_trainable_parameters()
        assert hf_report.row(adapter.name).parameters == trainable
    assert hf_report.row("base").parameters == 0


def test_conversion_scores_like_its_original(hf_report, adalora_llama, converted_llama):
    original, converted = hf_report.row(adalora_llama.name), hf_report.row(converted_llama.name)
    assert converted.method == "lora" and converted.converted_from == "adalora" and original.method == "adalora"
    assert converted.loss == pytest.approx(original.loss, abs=1e-4)
    assert converted.predictions == original.predictions


def test_generation_metrics_through_rouge_score(hf_report):
    from rouge_score import rouge_scorer

    assert hf_report.pairs == len(SENTENCES)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for row in hf_report.rows:
        assert len(row.predictions) == hf_report.pairs
        expected = sum(
            scorer.score(ref, pred)["rougeL"].fmeasure
            for ref, pred in zip(hf_report.references, row.predictions, strict=True)
        ) / len(row.predictions)
        assert row.rougeL == pytest.approx(expected)
        assert 0.0 <= row.exact_match <= 1.0


def test_forgetting_is_reference_loss_minus_the_base(hf_report):
    base = hf_report.row("base")
    assert base.forgetting == 0.0
    for row in hf_report.rows[1:]:
        assert row.forgetting == pytest.approx(row.reference_loss - base.reference_loss)


def test_prompt_and_reference_columns(tmp_path, tiny_llama, converted_llama):
    rows = [{"q": " ".join(s.split()[:3]), "a": " ".join(s.split()[3:])} for s in SENTENCES]
    data = tmp_path / "cols.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate(tiny_llama, [converted_llama], data=data, prompt_column="q", reference_column="a",
                      engine="hf", max_new_tokens=4, progress=False)  # fmt: skip
    assert report.references == [r["a"] for r in rows]
    # the loss text is prompt + space + reference: the same rows as the --split-on data without the marker
    texts = [f"{r['q']} {r['a']}" for r in rows]
    assert report.row("base").loss == pytest.approx(peft_loss(tiny_llama, None, texts), rel=LOSS_REL_TOL)


@pytest.mark.slow
def test_merged_model_scores_like_its_adapter(tmp_path, tiny_llama, converted_llama, qa):
    from adaconvert import merge

    merged = tmp_path / "merged"
    merge(tiny_llama, [converted_llama], merged)
    report = evaluate(tiny_llama, [converted_llama], merged=[merged], data=qa, split_on="answer :", engine="hf",
                      max_new_tokens=6, progress=False)  # fmt: skip
    row = report.row("merged")
    assert row.kind == "merged" and row.parameters is None
    assert row.loss == pytest.approx(report.row(converted_llama.name).loss, abs=1e-4)


@pytest.mark.slow
def test_cli_table_json_and_plot(tmp_path, tiny_llama, converted_llama, qa, capsys):
    plot = tmp_path / "quality.png"
    args = ["eval", str(tiny_llama), str(converted_llama), "--data", str(qa), "--split-on", "answer :"]
    args += ["--engine", "hf", "--max-new-tokens", "4", "--quiet"]
    assert main([*args, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and converted_llama.name in out and "in this run:" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = plot.read_bytes()
    assert main([*args, "--plot", str(plot)]) == 4  # exists, no --overwrite: refused before any work
    assert "pass --overwrite" in capsys.readouterr().err and plot.read_bytes() == before
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in data["rows"]] == ["base", converted_llama.name]


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("blank data", 2, "no usable eval row"),
        ("reference column missing", 2, "has no column 'answer'"),
        ("marker nowhere", 2, "no row contains the --split-on marker"),
        ("adapter for another base", 10, "it was made for another base"),
        ("merged of another architecture", 10, "it was not merged into this base"),
        ("missing adapter", 3, "no such file or directory"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(case, code, message, tmp_path, tiny_llama, tiny_gpt2,
                                                 adalora_gpt2, converted_llama, qa, capsys):  # fmt: skip
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n")
    args = {
        "blank data": [str(converted_llama), "--data", str(blank)],
        "reference column missing": [
            str(converted_llama),
            "--data",
            str(qa),
            "--prompt-column",
            "text",
            "--reference-column",
            "answer",
        ],
        "marker nowhere": [str(converted_llama), "--data", str(qa), "--split-on", "réponse :"],
        "adapter for another base": [str(adalora_gpt2), "--data", str(qa)],
        "merged of another architecture": ["--merged", str(tiny_gpt2), "--data", str(qa)],
        "missing adapter": [str(tmp_path / "nope"), "--data", str(qa)],
    }[case]
    plot = tmp_path / "p.png"
    assert main(["eval", str(tiny_llama), *args, "--engine", "hf", "--plot", str(plot)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not plot.exists() and list(tmp_path.iterdir()) == [blank]  # nothing written, nothing half-written


@pytest.mark.slow
def test_lora_drop_counts_stored_and_trained_parameters(trained, tiny_llama, qa):
    """A LoRA-Drop `share` output stores the shared LoRA once per layer: `parameters` is what the file holds (PEFT's
    count), `trained_parameters` what the main run trained (its training summary)."""
    from peft import PeftModel

    result = trained.get("lora-drop-share")
    report = evaluate(tiny_llama, [result.output], data=qa, engine="hf", progress=False)
    row = report.row(Path(result.output).name)
    model = PeftModel.from_pretrained(load_base(tiny_llama), str(result.output), is_trainable=True)
    assert row.method == "lora-drop" and row.parameters == model.get_nb_trainable_parameters()[0]
    assert row.trained_parameters == result.main.trainable_params < row.parameters
