"""Portability check: which LoRA runtimes compute the intended function from an adapter directory, and which do not.

Every runtime computes the scale of a module its own way (docs/design.md §3). From the
``adapter_config.json`` and the tensor shapes alone (no weights loaded), :func:`check_runtimes` says per runtime:

- ``exact``: it loads the adapter and applies the scale PEFT applies (the intended function);
- ``wrong-scale``: it loads it but scales some modules by another factor (``factors``: module → runtime scale /
  intended scale; 0 where it silently ignores a module);
- ``refused``: it fails to load it (``reason`` says why).

The rules are data (:data:`RUNTIMES`: name, the runtime source file/function each follows, a small check); the vLLM
verdict *is* the static vLLM check (:func:`adaconvert.compat.vllm.check_vllm_compat`). "Intended" is what PEFT
computes for a LoRA directory, and the trained model for an AdaLoRA one (``scaling.adalora_scaling``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from adaconvert.adapter import split_module_name
from adaconvert.compat.layout import is_mlx_config
from adaconvert.constants import ADAPTER_CONFIG_NAME, PEFT_PREFIX
from adaconvert.errors import InvalidConfigError
from adaconvert.io.source import read_json, resolve_source
from adaconvert.scaling import LoraPatterns, lora_scaling

EXACT, WRONG_SCALE, REFUSED = "exact", "wrong-scale", "refused"
# factors this close to 1 are float noise in the config (alpha 16 / r 16 written as 16.0000001), not a wrong scale
_FACTOR_RTOL = 1e-6


@dataclass(frozen=True)
class ModuleShape:
    """One module as the weights file describes it: A (rank, in), B (out, rank)."""

    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterFacts:
    """What every rule looks at: the config and the tensor shapes, grouped by module.

    Attributes:
        format: ``lora`` (PEFT LoRA), ``adalora`` (PEFT AdaLoRA) or ``mlx`` (an mlx-lm adapter directory).
        config: adapter_config.json.
        modules: module name (no ``base_model.model.``) → shape; for AdaLoRA the stored rank.
        path: the directory read.
        vllm_problems: what the static vLLM check found on this directory, when the caller ran it already; None: the
            vLLM rule runs it.
    """

    format: str
    config: dict
    modules: dict[str, ModuleShape]
    path: Path
    vllm_problems: list | None = None
    # module → intended scale, filled as the rules ask (each pattern lookup scans every key: 224 modules × 224 keys)
    _scales: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def intended_scale(self, module: str) -> float:
        """The scale PEFT (the reference) applies to ``module``: alpha_m / r_m or alpha_m / √r_m (rsLoRA), with
        PEFT's pattern matching (``peft/tuners/lora/model.py`` ``_create_and_replace`` via ``get_pattern_key``)."""
        if module not in self._scales:
            self._scales[module] = self._intended_scale(module)
        return self._scales[module]

    def _intended_scale(self, module: str) -> float:
        rank, alpha = self._patterns.rank_and_alpha(module)
        return lora_scaling(rank, alpha, use_rslora=bool(self.config.get("use_rslora")))

    def config_rank(self, module: str) -> int:
        """The rank the config gives ``module`` (``rank_pattern``, else ``r``)."""
        return self._patterns.rank_and_alpha(module)[0]

    @cached_property
    def _patterns(self) -> LoraPatterns:
        c = self.config
        return LoraPatterns(
            r=c["r"],
            lora_alpha=c["lora_alpha"],
            rank_pattern=c.get("rank_pattern"),
            alpha_pattern=c.get("alpha_pattern"),
        )


@dataclass(frozen=True)
class Verdict:
    """One runtime's verdict on one adapter.

    Attributes:
        runtime: a key of :data:`RUNTIMES`.
        status: ``exact``, ``wrong-scale`` or ``refused``.
        reason: one line: why it is wrong or refused (empty when exact).
        factors: for ``wrong-scale``, module → runtime scale / intended scale, for every module where it is not 1.
        notes: conditions the verdict depends on (another version, a kernel, a converter).
        source: the runtime code the rule follows.
    """

    runtime: str
    status: str
    reason: str = ""
    factors: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    source: str = ""

    @property
    def factor_range(self) -> tuple[float, float] | None:
        return (min(self.factors.values()), max(self.factors.values())) if self.factors else None

    def to_dict(self) -> dict:
        # not dataclasses.asdict: it deep-copies every float of ``factors`` one by one
        return {
            "runtime": self.runtime,
            "status": self.status,
            "reason": self.reason,
            "factors": dict(self.factors),
            "notes": list(self.notes),
            "source": self.source,
            "factor_range": self.factor_range,
        }


def read_facts(adapter_dir: str | Path) -> AdapterFacts:
    """Config and tensor shapes of a PEFT LoRA / AdaLoRA directory or an mlx-lm adapter directory (or a Hub id).

    Raises:
        SourceNotFoundError, CorruptCheckpointError: files missing or unreadable.
        InvalidConfigError: neither a PEFT LoRA / AdaLoRA config nor an mlx-lm one, or a required field missing.
    """
    from adaconvert.compat.vllm import tensor_shapes

    root = resolve_source(adapter_dir)
    config = read_json(root / ADAPTER_CONFIG_NAME)
    if is_mlx_config(config):
        return _mlx_facts(root, config)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "ADALORA"):
        raise InvalidConfigError(
            f"peft_type {config.get('peft_type')!r}: the portability check reads LORA and ADALORA adapters",
            path=root / ADAPTER_CONFIG_NAME,
        )
    required = ("init_r", "lora_alpha") if peft_type == "ADALORA" else ("r", "lora_alpha")
    missing = [f for f in required if not isinstance(config.get(f), int | float)]
    if missing:
        raise InvalidConfigError(f"missing or non-numeric {', '.join(missing)}", path=root / ADAPTER_CONFIG_NAME)
    keys = tensor_shapes(root)
    a_suffix, b_suffix = ("lora_A", "lora_B") if peft_type == "ADALORA" else ("lora_A.weight", "lora_B.weight")
    modules = {}
    for key, a in keys.items():
        if not key.endswith("." + a_suffix):
            continue
        name = key.removeprefix(PEFT_PREFIX).removesuffix("." + a_suffix)
        b = keys.get(key.removesuffix(a_suffix) + b_suffix)
        if len(a) == 2 and b is not None and len(b) == 2:
            modules[name] = ModuleShape(rank=a[0], in_features=a[1], out_features=b[0])
    return AdapterFacts(format=peft_type.lower(), config=config, modules=modules, path=root)


def _mlx_facts(root: Path, config: dict) -> AdapterFacts:
    from adaconvert.constants import MLX_ADAPTER_WEIGHTS_NAME
    from adaconvert.io.checkpoint import read_header

    path = root / MLX_ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        from adaconvert.errors import SourceNotFoundError

        raise SourceNotFoundError(f"mlx-lm adapter without {MLX_ADAPTER_WEIGHTS_NAME}", path=root)
    keys = {name: info.shape for name, info in read_header(path).items()}
    modules = {}
    for key, a in keys.items():
        if key.endswith(".lora_a") and len(a) == 2:
            b = keys.get(key.removesuffix("lora_a") + "lora_b", ())
            modules[key.removesuffix(".lora_a")] = ModuleShape(a[1], a[0], b[1] if len(b) == 2 else 0)
    return AdapterFacts(format="mlx", config=config, modules=modules, path=root)


# ---------------------------------------------------------------------------------------------------------------
# the rules, one small function per runtime


def _not_peft(facts: AdapterFacts, runtime: str) -> Verdict | None:
    if facts.format == "mlx":
        return Verdict(runtime, REFUSED, "an mlx-lm adapter directory (adapters.safetensors), not a PEFT one")
    return None


def _ratio(runtime_scale: float, intended: float) -> float:
    """runtime scale / intended scale; a module PEFT scales by 0 (lora_alpha 0) is exact only at 0 too."""
    if intended == 0:
        return 1.0 if runtime_scale == 0 else math.inf
    return runtime_scale / intended


def _wrong_or_exact(runtime: str, factors: dict[str, float], reason: str, **kw) -> Verdict:
    off = {m: f for m, f in sorted(factors.items()) if not math.isclose(f, 1.0, rel_tol=_FACTOR_RTOL)}
    return Verdict(runtime, WRONG_SCALE, reason, off, **kw) if off else Verdict(runtime, EXACT, **kw)


def _check_peft(facts: AdapterFacts) -> Verdict:
    """PEFT / transformers: the reference for LoRA (the intended scale is PEFT's), but a config rank that disagrees
    with a tensor's shape fails the load (``set_peft_model_state_dict`` → ``load_state_dict`` size mismatch).
    AdaLoRA: the trained scale lora_alpha / (init_r + 1e-5) is restored on reload (``adalora/model.py``
    ``resize_modules_by_rank_pattern`` copies ``ranknum`` back), except with ``lora_alpha <= 0``, where
    ``adalora/layer.py`` ``update_layer`` sets ``scaling = float(r)`` with r the *kept* rank: kept / init_r."""
    name = "peft"
    if (refused := _not_peft(facts, name)) is not None:
        return refused
    if facts.format == "adalora":
        c = facts.config
        if c["lora_alpha"] > 0 or not isinstance(c.get("rank_pattern"), dict):
            return Verdict(name, EXACT)
        factors = {m: s.rank / c["init_r"] for m, s in facts.modules.items() if s.rank}
        return _wrong_or_exact(
            name, factors, "lora_alpha <= 0: PEFT's reload scales by the kept rank instead of init_r"
        )
    mismatched = [m for m, s in sorted(facts.modules.items()) if s.rank != facts.config_rank(m)]
    if mismatched:
        m = mismatched[0]
        return Verdict(
            name,
            REFUSED,
            f"{len(mismatched)} module(s) whose tensors do not have the config's rank (first: {m}, rank "
            f"{facts.modules[m].rank}, config {facts.config_rank(m)}): size mismatch on load",
        )
    return Verdict(name, EXACT)


def _check_vllm(facts: AdapterFacts) -> Verdict:
    """vLLM: the static check (``vllm_compat``: ``PEFTHelper.validate_legal``, ``LoRAModel.from_local_checkpoint``);
    what it loads it scales like PEFT (``vllm/lora/peft_helper.py`` ``PEFTHelper.get_rank_and_scaling``: the same
    pattern rule, rsLoRA honoured)."""
    from adaconvert.compat.vllm import check_vllm_compat

    name = "vllm"
    if (refused := _not_peft(facts, name)) is not None:
        return refused
    problems = facts.vllm_problems if facts.vllm_problems is not None else check_vllm_compat(facts.path)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Verdict(name, REFUSED, f"{problems[0]}{more}")
    return Verdict(name, EXACT, notes=("vLLM >= 0.11 (per-module patterns); older versions use lora_alpha / r",))


def _only_lora_tensors(facts: AdapterFacts, runtime: str) -> Verdict | None:
    if facts.format == "adalora":
        return Verdict(runtime, REFUSED, "AdaLoRA checkpoint (lora_E, no .weight keys): convert it with to-lora")
    return None


def llama_cpp_scale_factors(facts: AdapterFacts) -> dict[str, float]:
    """Per module, the scale llama.cpp applies to a GGUF made from this PEFT directory by llama.cpp's own
    ``convert_lora_to_gguf.py``, relative to the intended scale (1.0 = exact).

    ``convert_lora_to_gguf.py`` writes ``adapter.lora.alpha = lora_alpha`` (patterns and ``use_rslora`` never
    read), and ``src/llama-adapter.h`` ``llama_adapter_lora_weight::get_scale`` computes
    ``alpha ? adapter_scale * alpha / rank : adapter_scale`` with ``rank = b->ne[0]``, the tensor's own rank.
    So a compact adapter (``lora_alpha = R``) gets R / r_m, a uniform one 1.

    Example:
        >>> llama_cpp_scale_factors(read_facts("runs/compact"))["model.layers.0.self_attn.q_proj"]
        2.0
    """
    alpha = float(facts.config["lora_alpha"])
    return {
        m: _ratio(alpha / s.rank if alpha else 1.0, facts.intended_scale(m)) for m, s in sorted(facts.modules.items())
    }


def _check_llama_cpp(facts: AdapterFacts) -> Verdict:
    """llama.cpp and Ollama (its llama.cpp runner): :func:`llama_cpp_scale_factors` (``convert_lora_to_gguf.py``,
    ``src/llama-adapter.h`` ``get_scale``); the converter refuses any tensor but ``lora_A`` / ``lora_B``."""
    name = "llama.cpp"
    if (refused := _not_peft(facts, name) or _only_lora_tensors(facts, name)) is not None:
        return refused
    notes = ["through llama.cpp's convert_lora_to_gguf.py; `adaconvert to-gguf` writes an exact GGUF from any layout"]
    if not isinstance(facts.config["lora_alpha"], int):
        # ollama convert/convert.go: AdapterParameters.Alpha is a uint32 (`json:"lora_alpha"`)
        notes.append(f"Ollama's own import refuses lora_alpha {facts.config['lora_alpha']!r} (parsed as uint32)")
    return _wrong_or_exact(
        name,
        llama_cpp_scale_factors(facts),
        "scale = lora_alpha / (each tensor's rank); rank_pattern, alpha_pattern and use_rslora are not read",
        notes=tuple(notes),
    )


def _check_sglang(facts: AdapterFacts) -> Verdict:
    """SGLang: ``python/sglang/srt/lora/lora.py`` ``LoRAAdapter.__init__`` asserts ``peft_type == lora`` and sets one
    ``scaling = lora_alpha / r`` (no rsLoRA, no alpha_pattern); ``mem_pool.py`` sizes the buffers by ``r`` and
    copies each module's tensors into them, which fails on a module whose rank is not ``r``."""
    name = "sglang"
    if (refused := _not_peft(facts, name) or _only_lora_tensors(facts, name)) is not None:
        return refused
    r = facts.config["r"]
    # lora_config.py of recent SGLang also reads rank_pattern / alpha_pattern (rank_overrides, alpha_overrides)
    notes = ()
    if facts.config.get("rank_pattern") or facts.config.get("alpha_pattern"):
        notes = ("rule of LoRAAdapter's single scale; SGLang versions whose lora_config.py reads the patterns differ",)
    other = [m for m, s in sorted(facts.modules.items()) if s.rank != r]
    if other:
        return Verdict(
            name,
            REFUSED,
            f"{len(other)} module(s) with a rank other than r = {r} (first: {other[0]}, rank "
            f"{facts.modules[other[0]].rank}): the buffer copy fails",
            notes=notes,
        )
    scale = facts.config["lora_alpha"] / r
    factors = {m: _ratio(scale, facts.intended_scale(m)) for m in facts.modules}
    reason = "one scale lora_alpha / r for every module (patterns, rsLoRA not read)"
    return _wrong_or_exact(name, factors, reason, notes=notes)


# LoRAX server/lorax_server/utils/sgmv.py: MIN_SGMV_RANK, SGMV_BLOCK_SIZE (pad_rank / pad_to_min_rank)
_SGMV_MIN_RANK, _SGMV_BLOCK = 8, 16


def _sgmv_padded(rank: int) -> int:
    return _SGMV_MIN_RANK if rank <= _SGMV_MIN_RANK else -(-rank // _SGMV_BLOCK) * _SGMV_BLOCK


def _check_lorax(facts: AdapterFacts) -> Verdict:
    """LoRAX (and TGI, whose ``adapters/lora.py`` is the same code): ``server/lorax_server/adapters/lora.py``
    ``LoraWeights.load``, per module kind across the layers: returns None (the kind is silently not applied) when a
    layer lacks it; scales every module by ``get_scaling_factor(lora_alpha, r, uses_rslora)`` (patterns not read);
    pads each rank with ``utils/sgmv.py`` ``pad_rank`` and ``torch.stack``s the layers, which fails when one kind's
    ranks pad to different sizes."""
    name = "lorax"
    if (refused := _not_peft(facts, name) or _only_lora_tensors(facts, name)) is not None:
        return refused
    kinds: dict[str, dict[int | None, ModuleShape]] = {}
    for m, s in facts.modules.items():
        layer, kind = split_module_name(m)
        kinds.setdefault(kind, {})[layer] = s
    layers = {layer for by_layer in kinds.values() for layer in by_layer if layer is not None}
    for kind, by_layer in sorted(kinds.items()):
        padded = {_sgmv_padded(s.rank) for s in by_layer.values()}
        if len(padded) > 1:
            return Verdict(
                name,
                REFUSED,
                f"{kind} ranks {sorted({s.rank for s in by_layer.values()})} pad to {sorted(padded)}: the layers "
                "cannot be stacked",
            )
    c = facts.config
    scale = lora_scaling(c["r"], c["lora_alpha"], use_rslora=bool(c.get("use_rslora")))
    factors = {m: _ratio(scale, facts.intended_scale(m)) for m in facts.modules}
    dropped = [kind for kind, by_layer in kinds.items() if None not in by_layer and set(by_layer) != layers]
    for m in facts.modules:
        if split_module_name(m)[1] in dropped:
            factors[m] = 0.0
    reason = "one scale lora_alpha / r (patterns not read)"
    if dropped:
        reason += f"; {', '.join(sorted(dropped))} missing in some layer, so not applied in any"
    # the adapter does not say how many layers the base has: a base with more drops every kind (factor 0)
    notes = [f"checked over the adapter's {len(layers)} layer(s); LoRAX needs each kind in every layer of the base"]
    if any(len({s.rank for s in by_layer.values()}) > 1 for by_layer in kinds.values()):
        notes.append("ranks differ within a module kind: stacking needs the SGMV kernels' padding (GPU builds)")
    return _wrong_or_exact(name, factors, reason, notes=tuple(notes))


def _check_mlx(facts: AdapterFacts) -> Verdict:
    """mlx-lm: ``mlx_lm/tuner/utils.py`` ``load_adapters`` reads only its own format (``adapters.safetensors`` with
    ``lora_a``/``lora_b``, ``lora_parameters`` with one rank and scale); ``linear_to_lora_layers`` requires
    ``scale`` and every tensor must match a wrapped module's shape (see ``writers/mlx_lm.py``)."""
    name = "mlx-lm"
    if facts.format != "mlx":
        return Verdict(name, REFUSED, "mlx-lm reads its own adapter format, not PEFT's: use `adaconvert to-mlx`")
    params = facts.config.get("lora_parameters") or {}
    if "scale" not in params or "rank" not in params:
        return Verdict(name, REFUSED, "lora_parameters lacks rank or scale")
    rank = params["rank"]
    off = [m for m, s in sorted(facts.modules.items()) if s.rank != rank]
    if off:
        return Verdict(name, REFUSED, f"{off[0]} has rank {facts.modules[off[0]].rank}, the config {rank}")
    return Verdict(name, EXACT)


@dataclass(frozen=True)
class Runtime:
    """One runtime: its display name, the code its rule follows, and the rule."""

    title: str
    source: str
    check: Callable[[AdapterFacts], Verdict]


RUNTIMES: dict[str, Runtime] = {
    "peft": Runtime(
        "PEFT / transformers",
        "peft/tuners/lora/model.py (get_pattern_key), peft/tuners/adalora/model.py (resize_modules_by_rank_pattern)",
        _check_peft,
    ),
    "vllm": Runtime("vLLM", "vllm/lora/peft_helper.py (validate_legal, get_rank_and_scaling)", _check_vllm),
    "llama.cpp": Runtime(
        "llama.cpp / Ollama",
        "convert_lora_to_gguf.py:528 (alpha = lparams['lora_alpha']), src/llama-adapter.h:55 (get_scale), "
        "as vendored in llama-cpp-python 0.3.36; Ollama: that llama.cpp, and convert/convert.go:35 (Alpha uint32)",
        _check_llama_cpp,
    ),
    "sglang": Runtime(
        "SGLang",
        "sglang@002c60a python/sglang/srt/lora/lora.py (LoRAAdapter: scaling = lora_alpha / r), "
        "lora_manager.py (max_lora_dim = max r)",
        _check_sglang,
    ),
    "lorax": Runtime(
        "LoRAX / TGI",
        "lorax@03679f3 server/lorax_server/adapters/lora.py (LoraWeights.load: get_scaling_factor(lora_alpha, r), "
        "return None when a layer lacks the module, pad_rank then torch.stack)",
        _check_lorax,
    ),
    "mlx-lm": Runtime("mlx-lm", "mlx_lm/tuner/utils.py (load_adapters, linear_to_lora_layers)", _check_mlx),
}


def check_runtimes(
    adapter_dir: str | Path, *, runtimes: list[str] | None = None, vllm_problems: list | None = None
) -> dict[str, Verdict]:
    """The portability check: runtime → :class:`Verdict` for one adapter directory, from config and shapes alone.

    Args:
        adapter_dir: a PEFT LoRA or AdaLoRA directory (ours or not: plain, rsLoRA, patterns, compact, uniform,
            raw AdaLoRA), an mlx-lm adapter directory, or a Hub id.
        runtimes: keys of :data:`RUNTIMES` to check (default all).
        vllm_problems: what :func:`~adaconvert.compat.vllm.check_vllm_compat` found on ``adapter_dir`` without a
            base (any ``max_lora_rank`` up to 512 the problems do not exceed), when the caller ran it already: the
            vLLM verdict is made from them instead of checking again.

    Raises:
        SourceNotFoundError, CorruptCheckpointError, InvalidConfigError: see :func:`read_facts`.

    Example:
        >>> verdicts = check_runtimes("runs/adalora-lora")
        >>> verdicts["llama.cpp"].status, verdicts["vllm"].status
        ('wrong-scale', 'exact')
    """
    facts = read_facts(adapter_dir)
    if vllm_problems is not None:
        facts = replace(facts, vllm_problems=vllm_problems)
    chosen = runtimes or list(RUNTIMES)
    unknown = [r for r in chosen if r not in RUNTIMES]
    if unknown:
        raise InvalidConfigError(f"unknown runtime(s) {unknown}; known: {', '.join(RUNTIMES)}")
    return {key: replace(RUNTIMES[key].check(facts), source=RUNTIMES[key].source) for key in chosen}


def runtimes_dict(verdicts: dict[str, Verdict]) -> dict[str, dict]:
    """JSON-ready form of :func:`check_runtimes`' result (``runtimes`` sections of reports)."""
    return {key: v.to_dict() for key, v in verdicts.items()}


def describe(verdict: dict) -> str:
    """One line for a verdict dict: ``exact``, ``wrong-scale on 5 module(s) (× 0.5–4): why``, ``refused: why``."""
    text = verdict["status"]
    if verdict.get("factor_range"):
        low, high = verdict["factor_range"]
        span = f"× {low:.3g}" if math.isclose(low, high) else f"× {low:.3g}–{high:.3g}"
        text += f" on {len(verdict['factors'])} module(s) ({span})"
    return f"{text}: {verdict['reason']}" if verdict.get("reason") else text


def title(key: str) -> str:
    """The display name of a runtime key (the key itself when unknown, e.g. from a newer report)."""
    return RUNTIMES[key].title if key in RUNTIMES else key


def runtimes_table(verdicts: dict[str, dict]) -> list[str]:
    """Lines of a fixed-width runtime → verdict table (``runtimes_dict`` form), for terminals."""
    width = max((len(title(k)) for k in verdicts), default=0)
    lines = []
    for key, v in verdicts.items():
        lines.append(f"{title(key):<{width}}  {describe(v)}")
        lines += [f"{'':<{width}}    note: {n}" for n in v.get("notes", ())]
    return lines


__all__ = [
    "RUNTIMES",
    "AdapterFacts",
    "Verdict",
    "check_runtimes",
    "describe",
    "llama_cpp_scale_factors",
    "read_facts",
    "runtimes_dict",
    "runtimes_table",
]
