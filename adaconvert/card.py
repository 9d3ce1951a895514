"""Model cards (README.md) for what we write: Hub metadata, the rank allocation, how to load it."""

from __future__ import annotations

from collections import defaultdict

from adaconvert.adapter import split_module_name
from adaconvert.report import ConversionReport

_METHOD_TAGS = {"adalora": "adalora", "lora-drop": "lora-drop", "lora": "lora"}


def rank_table(ranks: dict[str, int]) -> tuple[list[str], list[tuple[str, list[int | None]]]]:
    """(module kinds, [(layer label, rank per kind or None)]) for a layers × modules view of ``ranks``."""
    kinds: list[str] = []
    rows: dict[str, dict[str, int]] = defaultdict(dict)
    for name, rank in ranks.items():
        layer, kind = split_module_name(name)
        if kind not in kinds:
            kinds.append(kind)
        rows["-" if layer is None else str(layer)][kind] = rank
    order = sorted(rows, key=lambda k: (k == "-", int(k) if k.isdigit() else 0))
    return kinds, [(label, [rows[label].get(k) for k in kinds]) for label in order]


def markdown_rank_table(ranks: dict[str, int]) -> str:
    kinds, rows = rank_table(ranks)
    lines = ["| layer | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join("–" if r is None else str(r) for r in row) + " |" for label, row in rows]
    return "\n".join(lines)


def conversion_card(report: ConversionReport, *, base_model: str | None, repo_id: str | None = None) -> str:
    """README.md for a converted adapter: YAML metadata, what was done, the rank table, load snippets."""
    ranks = {m.name: m.rank_after for m in report.modules if m.rank_after}
    tags = ["lora", "peft", "converted", "adaconvert", _METHOD_TAGS.get(report.source_kind, report.source_kind)]
    meta = ["---", "library_name: peft", "pipeline_tag: text-generation"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta += ["tags:"] + [f"- {t}" for t in dict.fromkeys(tags)] + ["---"]
    where = repo_id or "path/to/this/adapter"
    saved = 1 - report.params_after / report.params_before if report.params_before else 0.0
    body = f"""
# Rank-varying LoRA converted from {report.source_kind}

Converted by adaconvert into a standard PEFT LoRA (`peft_type: LORA`): every module's scaling is folded into
`lora_B`, `r = lora_alpha = {report.max_rank}`, and `rank_pattern = alpha_pattern` give each module its own rank.

| | value |
|---|---|
| modules with weights | {len(ranks)} (of {len(report.modules)} in the source) |
| max rank | {report.max_rank} |
| parameters | {report.params_after:,} ({saved:.1%} fewer than the source's {report.params_before:,}) |
| dtype | {report.dtype} |
| max relative error of ΔW | {report.max_rel_error:.2e} |
| vLLM `--max-lora-rank` | {report.vllm_max_lora_rank} |

## Rank allocation

{markdown_rank_table(ranks)}

## Use it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{base_model or "BASE_MODEL"}")
model = PeftModel.from_pretrained(model, "{where}")
```

```bash
vllm serve {base_model or "BASE_MODEL"} --enable-lora --max-lora-rank {report.vllm_max_lora_rank} \\
    --lora-modules adapter={where}
```
"""
    return "\n".join(meta) + "\n" + body
