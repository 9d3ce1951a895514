"""Model cards (README.md) for what we write: Hub metadata, the rank allocation, sizes, figures, how to load it.

The YAML header holds the Hub's metadata fields, which the Hub (and huggingface_hub's ``ModelCard``) parse:
``base_model`` (only when it is a Hub id, never a local path), ``library_name``, ``pipeline_tag`` and ``tags``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from adaconvert.adapter import split_module_name
from adaconvert.compat.runtimes import describe
from adaconvert.compat.runtimes import title as runtime_title
from adaconvert.conversion.report import ConversionReport
from adaconvert.io.location import is_hub_id

_METHOD_TAGS = {"adalora": "adalora", "lora-drop": "lora-drop", "lora": "lora"}
METHOD_NAMES = {"adalora": "AdaLoRA", "lora-drop": "LoRA-Drop", "lora": "LoRA"}
# PEFT task_type → the Hub's pipeline_tag
_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
# what may go verbatim into a card's code snippets: a Hub id or a plain path; no space, quote, backtick, newline
# or other character that would end the string, the command line or the code block, and no leading "-" (an option)
_SNIPPET_RE = re.compile(r"[\w./~+@:][\w./~+@:-]*")


_KIND_ORDER = [
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "c_attn",
    "o_proj",
    "c_proj",
    "gate_proj",
    "up_proj",
    "c_fc",
    "down_proj",
]


def rank_table(ranks: dict[str, int]) -> tuple[list[str], list[tuple[str, list[int | None]]]]:
    """(module kinds, [(layer label, rank per kind or None)]) for a layers × modules view of ``ranks``."""
    kinds: list[str] = []
    rows: dict[str, dict[str, int]] = defaultdict(dict)
    for name, rank in ranks.items():
        layer, kind = split_module_name(name)
        if kind not in kinds:
            kinds.append(kind)
        rows["-" if layer is None else str(layer)][kind] = rank
    # columns in the order of a forward pass where the projection is a familiar one, others after, by name
    kinds.sort(
        key=lambda k: (_KIND_ORDER.index(k.rsplit(".", 1)[-1]) if k.rsplit(".", 1)[-1] in _KIND_ORDER else 99, k)
    )
    order = sorted(rows, key=lambda k: (k == "-", int(k) if k.isdigit() else 0))
    return kinds, [(label, [rows[label].get(k) for k in kinds]) for label in order]


def text_rank_table(ranks: dict[str, int]) -> list[str]:
    """Lines of a fixed-width layers × modules table of ``ranks``, for terminals ("-": module not targeted)."""
    kinds, rows = rank_table(ranks)
    short = [k.split(".")[-1] for k in kinds]
    widths = [max(len(s), 4) for s in short]
    lines = ["layer " + " ".join(s.rjust(w) for s, w in zip(short, widths, strict=True))]
    for label, row in rows:
        cells = ["-" if r is None else str(r) for r in row]
        lines.append(label.rjust(5) + " " + " ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return lines


def markdown_rank_table(ranks: dict[str, int]) -> str:
    kinds, rows = rank_table(ranks)
    lines = ["| layer | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join("–" if r is None else str(r) for r in row) + " |" for label, row in rows]
    return "\n".join(lines)


def hub_base_model(base_model: str | None) -> str | None:
    """``base_model`` if it can go into the Hub's ``base_model`` field: a repo id, not a local path."""
    return base_model if is_hub_id(base_model) else None


def snippet_id(model: str | None) -> str | None:
    """``model`` (a Hub id or local path) if it can be shown verbatim in a card's snippets, else None."""
    return model if isinstance(model, str) and _SNIPPET_RE.fullmatch(model) else None


def card_metadata(
    *, base_model: str | None, library_name: str, tags: list[str], pipeline_tag: str | None = "text-generation"
) -> str:
    """The ``---``-delimited YAML header of a model card: the Hub's ``base_model``, ``library_name``,
    ``pipeline_tag`` and ``tags`` (absent when None), written without a YAML library for four fields
    (huggingface_hub's ``ModelCard`` reads it back to the same values)."""
    fields = {"base_model": hub_base_model(base_model), "library_name": library_name, "pipeline_tag": pipeline_tag}
    lines = [f"{key}: {_yaml_string(value)}" for key, value in fields.items() if value is not None]
    if tags:
        lines += ["tags:", *(f"- {_yaml_string(tag)}" for tag in dict.fromkeys(tags))]
    return "---\n" + "\n".join(lines) + "\n---\n"


def _yaml_string(value: str) -> str:
    """``value`` as a YAML string: plain when it reads back as that string (a repo id, a tag), else JSON-quoted (a
    JSON string is a YAML double-quoted scalar: nothing in it can change the structure)."""
    plain = _PLAIN_YAML.fullmatch(value) and value.lower() not in _YAML_WORDS
    return value if plain else json.dumps(value)


# starts with a letter (no number, no indicator), then no character YAML gives a meaning to
_PLAIN_YAML = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}  # YAML 1.1 booleans and null


def figures_table(figures: Mapping, *, title: str = "figure") -> str:
    """A two-column markdown table of the scalar entries of ``figures`` (nested values are left out)."""
    lines = [f"| {title} | value |", "|---|---|"]
    for key, value in figures.items():
        if isinstance(value, bool | int | float | str) or value is None:
            lines.append(f"| {key} | {_fmt(value)} |")
    return "\n".join(lines)


def validation_table(validation: Mapping) -> str:
    """The checks of a ``validation_report.json`` (``adaconvert validate --report``) as a markdown table, with
    the verdict; a mapping without ``checks`` is shown as plain figures."""
    checks = validation.get("checks")
    if not isinstance(checks, list):
        return figures_table(validation)
    lines = ["| level | subject | check | value | limit | result |", "|---|---|---|---|---|---|"]
    for c in (c for c in checks if isinstance(c, Mapping)):
        limit = "" if c.get("limit") is None else ("≥ " if c.get("higher_is_better") else "≤ ") + _fmt(c["limit"])
        result = "info" if c.get("limit") is None else "ok" if c.get("passed") else "FAIL"
        cells = [c.get("level"), c.get("subject"), c.get("metric"), _fmt(c.get("value")), limit, result]
        lines.append("| " + " | ".join("" if x is None else str(x).replace("|", "\\|") for x in cells) + " |")
    if "passed" in validation:
        lines.append(f"\n**{'PASSED' if validation['passed'] else 'FAILED'}**")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "–" if value is None else str(value).replace("|", "\\|")


def _module_widths(report: ConversionReport) -> dict[str, int]:
    """in_features + out_features per module, recovered from the report's parameter counts (r · (in + out))."""
    widths = {}
    for m in report.modules:
        if m.rank_before:
            widths[m.name] = m.params_before // m.rank_before
        elif m.rank_after:
            widths[m.name] = m.params_after // m.rank_after
    return widths


def parameter_comparison(report: ConversionReport) -> list[tuple[str, int, str]]:
    """(what, parameters, note) rows: this adapter against fixed-rank LoRAs on the same modules."""
    widths = _module_widths(report)
    with_weights = {m.name for m in report.modules if m.rank_after}
    kept = sum(w for name, w in widths.items() if name in with_weights)
    total = sum(widths.values())
    rows = [("this adapter (rank per module)", report.params_after, f"max rank {report.max_rank}")]
    if report.params_before != report.params_after:
        rows.append(
            (f"source {report.source_kind} checkpoint as saved", report.params_before, "before stripping/compression")
        )
    if kept:
        rows.append(
            (
                f"fixed-rank LoRA, r = {report.max_rank} on the same modules",
                report.max_rank * kept,
                "what a single rank needs to keep every module's rank",
            )
        )
    init_r = report.provenance.get("init_r")
    if init_r and total:
        rows.append(
            (f"fixed-rank LoRA, r = {init_r} (init_r) on all source modules", init_r * total, "training budget")
        )
    if kept:
        rows.append(
            (
                "fixed-rank LoRA with the same parameter count",
                report.params_after,
                f"r ≈ {report.params_after / kept:.2f}",
            )
        )
    return rows


def runtimes_markdown(runtimes: Mapping) -> str:
    """The ``runtimes`` section of a report (the portability check of the files written) as a markdown table."""
    lines = ["| runtime | verdict on these files |", "|---|---|"]
    lines += [f"| {runtime_title(k)} | " + describe(v).replace("|", "\\|") + " |" for k, v in runtimes.items()]
    return "\n".join(lines)


def _peft_usage(report: ConversionReport, *, base: str, where: str, name: str) -> str:
    bucket = report.vllm_max_lora_rank or report.max_rank
    return f"""With PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(model, "{where}")
```

With vLLM (multi-LoRA serving; `--max-lora-rank` must be at least this adapter's max rank, {report.max_rank}):

```bash
vllm serve {base} --enable-lora --max-lora-rank {bucket} \\
    --lora-modules {name}={where}
```
"""


def _mlx_usage(report: ConversionReport, *, base: str, where: str, name: str) -> str:
    return f"""With mlx-lm (Apple silicon):

```bash
mlx_lm.generate --model {base} --adapter-path {where} --prompt "Hello"
```

```python
from mlx_lm import load, generate

model, tokenizer = load("{base}", adapter_path="{where}")
print(generate(model, tokenizer, prompt="Hello"))
```
"""


# layout → (what the files are, the library on the Hub, how to use them); the intro follows "Converted by adaconvert"
_FORMATS = {
    "compact": (
        "into a standard PEFT LoRA (`peft_type: LORA`): every module's scaling is folded into `lora_B`, "
        "`r = lora_alpha = {r}`, and `rank_pattern = alpha_pattern` give each module its own rank (layout *compact*).",
        "peft",
        _peft_usage,
    ),
    "uniform": (
        "into a standard PEFT LoRA (`peft_type: LORA`): every module's scaling is folded into `lora_B` and every "
        "module is zero-padded to rank `r = lora_alpha = {r}`, with no patterns (layout *uniform*).",
        "peft",
        _peft_usage,
    ),
    "mlx": (
        "into an mlx-lm adapter (`adapters.safetensors`, `lora_a` = Aᵀ, `lora_b` = Bᵀ): every module's scaling is "
        "folded into `lora_b`, every module of every block is zero-padded to rank {r}, and `scale` is 1.",
        "mlx",
        _mlx_usage,
    ),
}


def conversion_card(
    report: ConversionReport,
    *,
    base_model: str | None,
    repo_id: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    heatmap: str | None = None,
    validation: Mapping | None = None,
) -> str:
    """README.md for a converted adapter, in any of the layouts of :data:`_FORMATS` (``report.layout``).

    Args:
        report: what the conversion did (``conversion_report.json`` as a :class:`ConversionReport`).
        base_model: the base model id; goes into the YAML only when it is a Hub id, into the snippets unless
            it holds characters that would break them (:func:`snippet_id`; ``BASE_MODEL`` is shown then).
        repo_id: where the adapter lives on the Hub (``push`` passes it), for the snippets.
        task_type: PEFT ``task_type``, mapped to the Hub ``pipeline_tag``.
        heatmap: file name (relative to the card) of a rank heatmap image to show, if one was made.
        validation: a validation report (``adaconvert validate --report``; its checks are shown), if one was made.

    Returns:
        The card text: YAML metadata, summary, the runtimes the files are exact in (``report.runtimes``, the
        portability check of the files as written), rank allocation, parameter counts versus fixed-rank LoRA,
        conversion (and validation) figures, and how to load it.
    """
    intro, library, usage = _FORMATS[report.layout]
    ranks = {m.name: m.rank_after for m in report.modules if m.rank_after}
    method = _METHOD_TAGS.get(report.source_kind, report.source_kind)
    meta = card_metadata(
        base_model=base_model,
        library_name=library,
        tags=["lora", method, "converted", "adaconvert", library],
        pipeline_tag=_PIPELINE_TAGS.get(task_type or "", "text-generation"),
    )
    where = repo_id or "path/to/this/adapter"
    name = re.sub(r"[^\w.-]", "-", where.rsplit("/", 1)[-1]) if repo_id else "adapter"
    base = snippet_id(base_model) or "BASE_MODEL"
    saved = 1 - report.params_after / report.params_before if report.params_before else 0.0
    errors = [m.rel_error for m in report.modules if m.rank_after]
    params_rows = "\n".join(f"| {what} | {n:,} | {note} |" for what, n, note in parameter_comparison(report))
    heatmap_md = f"\n![rank per layer and module]({heatmap})\n" if heatmap else ""
    validation_md = f"\n## Validation\n\n{validation_table(validation)}\n" if validation else ""
    how = "removed" if report.layout == "compact" else "written as zeros"
    removed = f" ({len(report.removed_modules)} empty modules {how})" if report.removed_modules else ""
    bucket = report.vllm_max_lora_rank or report.max_rank
    bucket_row = f"| vLLM `--max-lora-rank` | {bucket} |\n" if library == "peft" else ""
    exact = [runtime_title(k) for k, v in report.runtimes.items() if v.get("status") == "exact"]
    runtimes_md = (
        f"""
## Runtimes

Exact (the intended scale on every module) in: {", ".join(exact) or "none of the runtimes checked"}.
From adaconvert's portability check of these files (`adaconvert inspect --runtimes`):

{runtimes_markdown(report.runtimes)}
"""
        if report.runtimes
        else ""
    )
    return (
        meta
        + f"""
# Rank-varying LoRA converted from {METHOD_NAMES.get(report.source_kind, report.source_kind)}

Converted by adaconvert {intro.format(r=report.max_rank)}

| | value |
|---|---|
| modules with weights | {len(ranks)} (of {len(report.modules)} in the source){removed} |
| max rank | {report.max_rank} |
| parameters | {report.params_after:,} ({saved:.1%} fewer than the source's {report.params_before:,}) |
| size | {report.bytes_after / 2**20:.2f} MiB ({report.dtype}) |
{bucket_row}| layout | {report.layout_summary()} |
{runtimes_md}
## Rank allocation

{markdown_rank_table(ranks)}
{heatmap_md}
## Parameters versus fixed-rank LoRA

| adapter | parameters | note |
|---|---|---|
{params_rows}

## Conversion

| figure | value |
|---|---|
| max relative error of ΔW (Frobenius, per module) | {report.max_rel_error:.2e} |
| mean relative error of ΔW | {(sum(errors) / len(errors) if errors else 0.0):.2e} |
| dtype written | {report.dtype} |
| source | {report.source_kind} |
{validation_md}
## Use it

{usage(report, base=base, where=where, name=name)}"""
    )


def gguf_card(report: ConversionReport, filename: str, *, base_model: str, arch: str) -> str:
    """The model card of a GGUF adapter: what it is, where it is exact, and how to run it in llama.cpp and Ollama.

    Args:
        report: the conversion report.
        filename: the GGUF file's name, for the snippets.
        base_model: the base model id or path the adapter belongs to.
        arch: the GGUF architecture (``general.architecture``), which the base GGUF must have.
    """
    ranks = {m.name: m.rank_after for m in report.modules if m.rank_after}
    shown = snippet_id(base_model) or "BASE_MODEL"  # a value that would break the card's code is not pasted in
    tags = ["lora", "gguf", "llama.cpp", report.source_kind, "adaconvert"]
    meta = card_metadata(base_model=base_model, library_name="gguf", tags=tags)
    return (
        meta
        + f"""
# GGUF LoRA adapter converted from {METHOD_NAMES.get(report.source_kind, report.source_kind)}

`{filename}`: a LoRA adapter for llama.cpp and Ollama (GGUF architecture `{arch}`, tensors `{report.dtype}`),
converted by adaconvert. Each module keeps its own rank; every scaling is folded into `lora_b` and
`adapter.lora.alpha = 0`, so llama.cpp applies scale exactly 1 to every tensor (`src/llama-adapter.h`:
`scale = alpha ? adapter_scale * alpha / rank : adapter_scale`). Exact in llama.cpp: adaconvert's tests compare
llama-cpp-python 0.3.36 running such a file with PEFT running the original adapter. Ollama applies `ADAPTER` files
through the llama.cpp it vendors (not run by those tests). PEFT, vLLM and mlx-lm do not read GGUF adapters (convert
the source with `adaconvert to-lora` or `to-mlx` for those).

| | value |
|---|---|
| base model | {shown} |
| modules | {len(ranks)} |
| max rank | {report.max_rank} |
| parameters | {report.params_after:,} (source: {report.params_before:,}) |
| file size | {report.bytes_after / 2**20:.2f} MiB |
| max relative error of ΔW | {report.max_rel_error:.2e} |
| layout | {report.layout_summary()} |

## Rank allocation

{markdown_rank_table(ranks)}

## Use it

The base model must be a GGUF of the same architecture made from `{shown}` (e.g. by llama.cpp's
`convert_hf_to_gguf.py`); the adapter's tensor names and q/k row order are those that script gives the base.

llama.cpp:

```bash
llama-server -m BASE.gguf --lora {filename}
llama-cli -m BASE.gguf --lora {filename} -p "..."
```

Ollama (`Modelfile`, then `ollama create my-model -f Modelfile`):

```
FROM ./BASE.gguf
ADAPTER ./{filename}
```
"""
    )


def merged_card(
    *,
    base_model: str | None,
    adapter: str | None = None,
    source_kind: str = "lora",
    repo_id: str | None = None,
    figures: Mapping | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> str:
    """README.md for a full model with an adapter merged into its weights.

    Args:
        base_model: the base model the adapter was merged into.
        adapter: the adapter(s) merged (path or Hub id, with weights), if known.
        source_kind: ``adalora``, ``lora-drop`` or ``lora``, for the tags.
        repo_id: where the model lives on the Hub, for the snippets.
        figures: scalar figures of the merge / its validation (max weight error, logit difference...).
        task_type: PEFT ``task_type``, mapped to the Hub ``pipeline_tag``.

    Returns:
        The card text: YAML metadata (``library_name: transformers``, tags ``merged`` and the method), what was
        merged, the figures, and transformers / vLLM snippets.
    """
    method = _METHOD_TAGS.get(source_kind, source_kind)
    meta = card_metadata(
        base_model=base_model,
        library_name="transformers",
        tags=["merged", "lora", method, "adaconvert"],
        pipeline_tag=_PIPELINE_TAGS.get(task_type or "", "text-generation"),
    )
    where = repo_id or "path/to/this/model"
    base = snippet_id(hub_base_model(base_model) or (Path(base_model).name if base_model else None))  # no paths
    merged_from = f" with `{adapter}`" if adapter else ""
    figures_md = f"\n## Figures\n\n{figures_table(figures)}\n" if figures else ""
    return (
        meta
        + f"""
# {base or "Base model"} with a merged {METHOD_NAMES.get(source_kind, source_kind)} adapter

`{base or "the base model"}`{merged_from} merged into the base weights by adaconvert: no adapter at
inference time, no extra latency.
{figures_md}
## Use it

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{where}")
```

```bash
vllm serve {where}
```
"""
    )
