"""vLLM's rules for LoRA adapters that can be checked without starting an engine (docs/design.md §4).

The checks mirror vLLM's own loader (``vllm/lora/peft_helper.py``: ``PEFTHelper.__post_init__`` and
``validate_legal``; ``vllm/lora/lora_model.py`` and ``utils.parse_fine_tuned_lora_name`` for tensor keys), so that
an adapter passing here loads in vLLM, and one failing here is one vLLM rejects — or, for ``unknown-module``, one
whose weights vLLM would silently ignore. ``tests/test_vllm_static.py`` checks each rule against a real engine.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from adaconvert.constants import ADAPTER_CONFIG_NAME, PEFT_PREFIX
from adaconvert.errors import AdaconvertError, InvalidConfigError, RankLimitError
from adaconvert.io.source import read_json, resolve_source
from adaconvert.scaling import LoraPatterns, pattern_error

logger = logging.getLogger(__name__)

# The values vLLM accepts for --max-lora-rank. Kernels compute over the whole bucket, so smaller is faster.
MAX_LORA_RANK_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def smallest_bucket(rank: int) -> int | None:
    """The smallest valid ``max_lora_rank`` ≥ ``rank``; None when no bucket is large enough."""
    return next((b for b in MAX_LORA_RANK_BUCKETS if b >= rank), None)


def check_bucket(value: int) -> int:
    """``value`` if vLLM accepts it as ``max_lora_rank``, else InvalidConfigError listing the valid ones."""
    if value not in MAX_LORA_RANK_BUCKETS:
        raise InvalidConfigError(
            f"vLLM's max_lora_rank must be one of {', '.join(map(str, MAX_LORA_RANK_BUCKETS))}; got {value}"
        )
    return value


# Every rule the static check knows, with what vLLM does when it is broken. One table, so docs and tests agree.
RULES: dict[str, str] = {
    "files": "adapter_config.json or the weights file is missing or unreadable (vLLM: load error)",
    "config-field": "r, lora_alpha or target_modules missing (vLLM: 'Missing required configuration fields')",
    "rank": "r is not a positive integer (vLLM: 'LoRA rank `r` must be a positive integer')",
    "rank-pattern": "a rank_pattern value is not a positive integer, e.g. AdaLoRA's boolean lists (vLLM: ValueError), "
    "or a rank_pattern / alpha_pattern key is not a valid regular expression (vLLM: re.error)",
    "max-lora-rank": "a rank above max_lora_rank, or above 512 (vLLM: 'LoRA rank N is greater than max_lora_rank')",
    "bias": "bias is not 'none' (vLLM: 'Adapter bias is not supported')",
    "feature": "DoRA, lora_bias, aLoRA, layer_replication, BD-LoRA or QALoRA (vLLM: 'does not support ...')",
    "init": "PiSSA / OLoRA / CorDA / LoftQ initialisation, which changes the base weights (vLLM: rejected)",
    "modules-to-save": "modules_to_save other than classifier/score (vLLM: rejected)",
    "key": "a tensor key that is not <module>.lora_A.weight / .lora_B.weight (vLLM: 'unsupported LoRA weight')",
    "unsupported-module": "a module kind the base model has no LoRA-capable layer for (vLLM: 'expected target "
    "modules in ... but received ...')",
    "unknown-module": "a module name that matches no module of the base model (vLLM: silently ignored, base outputs)",
    "shape": "lora_A / lora_B missing their partner or not fitting each other, the config's rank or the base layer "
    "(vLLM: wrong scaling or a crash when the adapter is activated)",
}

_BASE_EMBEDDING_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
_SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_FEATURE_FLAGS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias (lora_bias)",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QALoRA",
}


@dataclass(frozen=True)
class VllmProblem:
    """One reason vLLM would reject (or silently mis-serve) an adapter.

    Attributes:
        rule: a key of :data:`RULES`.
        message: what is wrong, in one line.
        module: the module concerned (name without ``base_model.model.``), if any.
    """

    rule: str
    message: str
    module: str | None = None

    def __str__(self) -> str:
        where = f"module {self.module}: " if self.module else ""
        return f"[{self.rule}] {where}{self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


def check_vllm_compat(
    adapter_dir: str | Path, *, max_lora_rank: int | None = None, base_config=None
) -> list[VllmProblem]:
    """Check an adapter directory against vLLM's rules without starting an engine; return every problem found.

    Args:
        adapter_dir: a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors / .bin / .pt) or a
            Hub repo id.
        max_lora_rank: the ``--max-lora-rank`` it will be served with (a valid bucket). Without it, ranks are
            only checked against the largest bucket, 512.
        base_config: the base model: a :class:`~adaconvert.base.model.BaseModel` (resolved once by the caller)
            or anything :meth:`BaseModel.resolve <adaconvert.base.model.BaseModel.resolve>` takes. With it, module
            names and shapes are checked against the base model too (``unknown-module``, ``unsupported-module``,
            layer shapes).

    Returns:
        The problems, in the order vLLM meets them (config, ranks, features, keys, modules, shapes); empty when
        vLLM would load and apply the adapter.

    Raises:
        InvalidConfigError: ``max_lora_rank`` is not a vLLM bucket, or the base config cannot be read.

    Example:
        >>> problems = check_vllm_compat("runs/adalora-lora", max_lora_rank=16, base_config="models/base")
        >>> [str(p) for p in problems]
        []
    """
    if max_lora_rank is not None:
        check_bucket(max_lora_rank)
    try:
        root = resolve_source(adapter_dir)
        config = read_json(root / ADAPTER_CONFIG_NAME)
        shapes = tensor_shapes(root)
    except AdaconvertError as exc:
        return [VllmProblem("files", str(exc))]
    problems = _check_config(config, max_lora_rank=max_lora_rank)
    modules = _check_keys(shapes, problems)
    if base_config is not None:
        from adaconvert.base.model import BaseModel  # torch and transformers: only when a base is given

        _check_against_base(modules, BaseModel.resolve(base_config).modules, config, problems)
    _check_shapes(modules, config, max_lora_rank, problems)
    return problems


def require_vllm_compat(
    adapter_dir: str | Path,
    *,
    max_lora_rank: int | None = None,
    base_config=None,
    what: str | None = None,
    warn_only: tuple[str, ...] = (),
) -> list[VllmProblem]:
    """Raise if :func:`check_vllm_compat` finds anything; the message lists every problem.

    Args:
        what: how to call the adapter in the message (default ``adapter``).
        warn_only: rules (keys of :data:`RULES`) that are only logged as warnings.

    Returns:
        What :func:`check_vllm_compat` found: only problems of the ``warn_only`` rules, as it did not raise.

    Raises:
        RankLimitError: every problem is a rank above ``max_lora_rank``.
        InvalidConfigError: anything else; ``fields['problems']`` holds the :class:`VllmProblem` dicts.
    """
    found = check_vllm_compat(adapter_dir, max_lora_rank=max_lora_rank, base_config=base_config)
    for problem in (p for p in found if p.rule in warn_only):
        logger.warning("%s: vLLM would not serve it: %s", adapter_dir, problem)
    problems = [p for p in found if p.rule not in warn_only]
    if not problems:
        return found
    cls = RankLimitError if all(p.rule == "max-lora-rank" for p in problems) else InvalidConfigError
    raise cls(
        f"{what or 'adapter'} would not load in vLLM: {'; '.join(map(str, problems))}",
        path=adapter_dir,
        problems=[p.to_dict() for p in problems],
    )


@dataclass
class StaticCheck:
    """The static check of several adapters: adapter → the problems vLLM would meet (empty: it would load)."""

    found: dict[str, list[VllmProblem]]

    def to_dict(self) -> dict:
        return {adapter: [p.to_dict() for p in problems] for adapter, problems in self.found.items()}

    def text(self) -> str:
        lines = []
        for adapter, problems in self.found.items():
            lines.append(f"{adapter}: {len(problems)} problem(s)" if problems else f"{adapter}: ok")
            lines += [f"  {p}" for p in problems]
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise when any adapter has a problem.

        Raises:
            ValidationError: naming the first problem; ``fields['problems']`` lists them per adapter.
        """
        failed = {adapter: problems for adapter, problems in self.found.items() if problems}
        if failed:
            from adaconvert.errors import ValidationError

            first = next(iter(failed))
            problems = {adapter: [str(p) for p in ps] for adapter, ps in failed.items()}
            raise ValidationError(f"vLLM would not load it: {failed[first][0]}", path=first, problems=problems)


def static_check(adapters, *, max_lora_rank: int | None = None, base=None) -> StaticCheck:
    """:func:`check_vllm_compat` for each of ``adapters``, the base (if any) resolved once for all of them."""
    if base is not None:
        from adaconvert.base.model import BaseModel

        base = BaseModel.resolve(base)
    found = {str(a): check_vllm_compat(a, max_lora_rank=max_lora_rank, base_config=base) for a in adapters}
    return StaticCheck(found)


def tensor_shapes(adapter_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the weights file vLLM would read (safetensors first, then .bin / .pt), without loading
    safetensors data.

    Raises:
        SourceNotFoundError: no weights file. CorruptCheckpointError: it cannot be parsed.
    """
    from adaconvert.io.source import load_tensors, weights_file

    path = weights_file(Path(adapter_dir))
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in load_tensors(path).items()}
    stat = path.stat()
    return dict(_header_shapes(path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _header_shapes(path: Path, *identity: int) -> dict[str, tuple[int, ...]]:
    """The shapes in ``path``'s safetensors header, read once per version of the file (``identity``: device, inode,
    size, modification time): a conversion's static vLLM check and its runtime verdicts both read the output's."""
    from adaconvert.io.checkpoint import read_header

    return {name: info.shape for name, info in read_header(path).items()}


def served_rank(config: dict) -> int:
    """The rank vLLM compares with ``max_lora_rank``: max(r, *rank_pattern values)."""
    pattern = config.get("rank_pattern")
    values = [
        v for v in (config.get("r"), *(pattern.values() if isinstance(pattern, dict) else ())) if isinstance(v, int)
    ]
    return max(values, default=0)


def _check_config(config: dict, *, max_lora_rank: int | None) -> list[VllmProblem]:
    problems = []
    missing = [f for f in ("r", "lora_alpha", "target_modules") if f not in config]
    if missing:
        problems.append(VllmProblem("config-field", f"adapter_config.json lacks {', '.join(missing)}"))
    r = config.get("r")
    if "r" in config and not (isinstance(r, int | float) and r > 0):
        problems.append(VllmProblem("rank", f"r must be a positive integer, got {r!r}"))
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        problems.append(VllmProblem("rank-pattern", f"rank_pattern must be an object, got {type(pattern).__name__}"))
        pattern = {}
    bad = {k: v for k, v in pattern.items() if not isinstance(v, int) or v <= 0}  # vLLM lets True through as 1
    for key, value in list(bad.items())[:3]:
        shown = f"a list of {len(value)} booleans (raw AdaLoRA mask)" if isinstance(value, list) else repr(value)
        problems.append(VllmProblem("rank-pattern", f"rank_pattern[{key!r}] must be a positive integer, got {shown}"))
    if len(bad) > 3:
        problems.append(VllmProblem("rank-pattern", f"... and {len(bad) - 3} more rank_pattern entries like these"))
    for field in ("rank_pattern", "alpha_pattern"):  # vLLM matches each key as PEFT does, with re.match
        keys = config.get(field) if isinstance(config.get(field), dict) else {}
        for key, error in [(k, e) for k in keys if (e := pattern_error(k)) is not None][:3]:
            problems.append(VllmProblem("rank-pattern", f"{field} key {key!r} is not a regular expression ({error})"))
    limit = max_lora_rank if max_lora_rank is not None else MAX_LORA_RANK_BUCKETS[-1]
    rank = served_rank(config)
    if rank > limit:
        problems.append(VllmProblem("max-lora-rank", f"LoRA rank {rank} is greater than max_lora_rank {limit}"))
    if config.get("bias", "none") != "none":
        problems.append(VllmProblem("bias", f"bias={config['bias']!r} is not supported (only 'none')"))
    for flag, what in _FEATURE_FLAGS.items():
        if config.get(flag):
            problems.append(VllmProblem("feature", f"{what} is not supported ({flag}={config[flag]!r})"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SUPPORTED_INITS:
        problems.append(
            VllmProblem("init", f"init_lora_weights={init!r} changes the base weights; convert it with PEFT first")
        )
    extra = [m for m in _modules_to_save(config) if m not in ("classifier", "score")]
    if not isinstance(config.get("modules_to_save") or [], list):
        problems.append(
            VllmProblem("modules-to-save", f"modules_to_save must be a list, got {config['modules_to_save']!r}")
        )
    elif extra:
        problems.append(VllmProblem("modules-to-save", f"modules_to_save {extra} (only classifier/score)"))
    return problems


def _modules_to_save(config: dict) -> list[str]:
    value = config.get("modules_to_save")
    return [m for m in value if isinstance(m, str)] if isinstance(value, list) else []


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """(module name, part) of a tensor key the way vLLM parses it; None for a key vLLM rejects.

    ``part`` is ``lora_A`` / ``lora_B`` / ``lora_embedding_A`` / ``lora_embedding_B`` / ``head`` (classifier heads).
    Keys with ``base_model.model.`` lose it; keys without keep their whole path (vLLM accepts both).
    """
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2]
    if len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in ("score", "classifier"):
        return parts[-2], "head"
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), parts[-1]
    return None


def _check_keys(shapes: dict[str, tuple[int, ...]], problems: list[VllmProblem]) -> dict[str, dict[str, tuple]]:
    """{module: {part: shape}} of the keys vLLM accepts; a problem for each key it rejects (at most 5 listed)."""
    modules: dict[str, dict[str, tuple]] = {}
    rejected = []
    for key, shape in shapes.items():
        if key.endswith(_BASE_EMBEDDING_SUFFIXES):
            continue
        parsed = parse_lora_key(key)
        if parsed is None:
            rejected.append(key)
            continue
        modules.setdefault(parsed[0], {})[parsed[1]] = shape
    for key in rejected[:5]:
        problems.append(VllmProblem("key", f"tensor {key!r} is not a LoRA weight vLLM can load"))
    if len(rejected) > 5:
        problems.append(VllmProblem("key", f"... and {len(rejected) - 5} more keys like these"))
    return modules


def _check_against_base(modules: dict, base: dict, config: dict, problems: list[VllmProblem]) -> None:
    supported = {name.rsplit(".", 1)[-1] for name in base}
    heads = set(_modules_to_save(config))
    unknown = []
    for module, parts in sorted(modules.items()):
        if "head" in parts:
            continue
        suffix = module.rsplit(".", 1)[-1]
        if suffix not in supported and suffix not in heads:
            problems.append(
                VllmProblem("unsupported-module", f"{suffix!r} is not a LoRA-capable layer of the base", module)
            )
        elif module not in base:
            unknown.append(module)
    for module in unknown[:5]:
        problems.append(
            VllmProblem(
                "unknown-module",
                "matches no module of the base model: vLLM would silently ignore it (wrong key prefix?)",
                module,
            )
        )
    if len(unknown) > 5:
        problems.append(VllmProblem("unknown-module", f"... and {len(unknown) - 5} more modules like these"))
    for module, parts in sorted(modules.items()):
        layer = base.get(module)
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if layer is None or a is None or b is None or len(a) != 2 or len(b) != 2 or layer.kind == "embedding":
            continue
        if (a[1], b[0]) != (layer.in_features, layer.out_features):
            problems.append(
                VllmProblem(
                    "shape",
                    f"lora_A {list(a)} / lora_B {list(b)} do not fit the base layer "
                    f"({layer.in_features} in, {layer.out_features} out)",
                    module,
                )
            )


def _check_shapes(modules: dict, config: dict, max_lora_rank: int | None, problems: list[VllmProblem]) -> None:
    rank_pattern = config.get("rank_pattern") if isinstance(config.get("rank_pattern"), dict) else {}
    usable_pattern = {k: v for k, v in rank_pattern.items() if pattern_error(k) is None}
    r = config.get("r") if isinstance(config.get("r"), int) else None
    limit = max_lora_rank if max_lora_rank is not None else MAX_LORA_RANK_BUCKETS[-1]
    patterns = LoraPatterns(r=r or 0, lora_alpha=1.0, rank_pattern=usable_pattern)
    for module, parts in sorted(modules.items()):
        if "head" in parts:
            continue
        a, b = parts.get("lora_A", parts.get("lora_embedding_A")), parts.get("lora_B", parts.get("lora_embedding_B"))
        if a is None or b is None:
            problems.append(
                VllmProblem("shape", f"has {'lora_B' if a is None else 'lora_A'} but not its partner", module)
            )
            continue
        if "lora_A" not in parts:
            continue  # embedding LoRA: A (r, vocab), B (dim, r) in PEFT; vLLM checks the vocabulary itself
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(VllmProblem("shape", f"lora_A {list(a)} and lora_B {list(b)} do not fit", module))
            continue
        if a[0] > limit:
            problems.append(
                VllmProblem("max-lora-rank", f"tensors have rank {a[0]}, above max_lora_rank {limit}", module)
            )
        if r is not None and not any(p.rule == "rank-pattern" for p in problems):
            expected, _ = patterns.rank_and_alpha(module)
            if a[0] != expected:
                problems.append(
                    VllmProblem(
                        "shape",
                        f"adapter_config.json gives rank {expected} but the tensors have rank {a[0]} "
                        "(vLLM would scale by the wrong alpha/r)",
                        module,
                    )
                )


def bucket_for(adapter_dirs, *, minimum: int = 1) -> int:
    """The smallest ``max_lora_rank`` bucket that serves every adapter in ``adapter_dirs`` (and ≥ ``minimum``).

    Raises:
        RankLimitError: an adapter's rank exceeds the largest bucket.
    """
    need = minimum
    for d in adapter_dirs:
        need = max(need, served_rank(read_json(Path(d) / ADAPTER_CONFIG_NAME)), *tensor_ranks(d))
    bucket = smallest_bucket(need)
    if bucket is None:
        raise RankLimitError(
            f"rank {need} is above vLLM's largest max_lora_rank {MAX_LORA_RANK_BUCKETS[-1]}; compress it with "
            "`adaconvert to-lora --max-rank`",
            expected=MAX_LORA_RANK_BUCKETS[-1],
            actual=need,
        )
    return bucket


def tensor_ranks(adapter_dir) -> list[int]:
    """Rank (rows of lora_A) of every module of an adapter directory."""
    return [shape[0] for key, shape in tensor_shapes(adapter_dir).items() if key.endswith("lora_A.weight") and shape]


__all__ = [
    "MAX_LORA_RANK_BUCKETS",
    "RULES",
    "VllmProblem",
    "bucket_for",
    "check_bucket",
    "check_vllm_compat",
    "require_vllm_compat",
    "smallest_bucket",
]
