"""The base model an adapter belongs to, resolved once: where it is, its config, and what a LoRA can adapt in it.

Every verb that needs the base (validate, serve, the static vLLM check, merge's requantisation, train's checks)
resolves it here and passes the :class:`BaseModel` down, so a Hub id is fetched once, the config is parsed once,
and the ``meta``-device model (names and shapes, no memory, no weights) is built at most once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from adaconvert.constants import MODEL_CONFIG_NAME
from adaconvert.errors import AdaconvertError, InvalidConfigError, SourceNotFoundError
from adaconvert.io.checkpoint import Checkpoint, open_checkpoint, resolve_checkpoint
from adaconvert.io.source import read_json, read_model_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModule:
    """One layer of the base model that a LoRA may adapt.

    Attributes:
        kind: ``linear``, ``conv1d`` (GPT-2 style, weight stored (in, out)) or ``embedding``.
        in_features: input width; for an embedding, the vocabulary size.
        out_features: output width; for an embedding, the embedding dimension.
    """

    kind: str
    in_features: int
    out_features: int


@dataclass(eq=False)
class BaseModel:
    """A base model: ``source`` as given, ``root`` the local directory holding its ``config.json`` (a Hub
    snapshot for repo ids; None when built from a config object), ``config`` its transformers config.

    Build it with :meth:`resolve`; ``modules``, ``quantized_modules`` and ``checkpoint`` are computed on first use.
    """

    source: str
    root: Path | None
    config: object = field(repr=False)

    @classmethod
    def resolve(cls, base, *, weights: bool = False) -> BaseModel:
        """A :class:`BaseModel` from a model directory, its ``config.json``, a Hub model id, a config dict, a
        transformers ``PretrainedConfig``, or a :class:`BaseModel` (returned as it is).

        Args:
            weights: a Hub id is fetched with its safetensors weights and tokenizer (else its config alone).

        Raises:
            SourceNotFoundError: no such directory or config.json, and no Hub model of that id.
            InvalidConfigError: transformers cannot make a config of it.

        Example:
            >>> BaseModel.resolve("models/tiny-llama").modules["model.layers.0.self_attn.q_proj"]
            BaseModule(kind='linear', in_features=64, out_features=64)
        """
        from transformers import AutoConfig, PretrainedConfig

        if isinstance(base, BaseModel):
            return base
        if isinstance(base, PretrainedConfig):
            return cls(source=type(base).__name__, root=None, config=base)
        if isinstance(base, dict):
            return cls(source="config", root=None, config=_config_from_dict(base))
        path = Path(base)
        if path.is_file():  # a config.json given directly
            root = path.parent
        elif weights:
            root = resolve_checkpoint(base)
        else:
            root = read_model_config(base)[1].parent  # a Hub id: config.json alone (or the cache's copy)
        config_path = root / MODEL_CONFIG_NAME
        if not config_path.is_file():
            raise SourceNotFoundError(f"no {MODEL_CONFIG_NAME}: expected a base model directory", path=root)
        text_config = read_json(config_path).get("text_config", {})  # hostile JSON: one line, not a traceback
        if not isinstance(text_config, dict | None):
            raise InvalidConfigError("field 'text_config' must be an object", path=config_path)
        try:
            config = AutoConfig.from_pretrained(str(root))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidConfigError(f"cannot read the base model config ({exc})", path=config_path) from exc
        return cls(source=str(base), root=root, config=config)

    @cached_property
    def meta_model(self) -> torch.nn.Module:
        """The causal LM built from the config on the ``meta`` device: every module's name and shape, no memory."""
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(self.config)
        except (ValueError, KeyError) as exc:
            why = f"cannot build a causal LM from the base config ({exc})"
            raise InvalidConfigError(why, path=self.source) from exc

    @cached_property
    def modules(self) -> dict[str, BaseModule]:
        """``{module name: BaseModule}`` for every Linear, Conv1D and Embedding, named as PEFT names them after
        ``base_model.model.`` (``model.layers.0.self_attn.q_proj``)."""
        from transformers.pytorch_utils import Conv1D

        found: dict[str, BaseModule] = {}
        for name, module in self.meta_model.named_modules():
            if isinstance(module, torch.nn.Linear):
                found[name] = BaseModule("linear", module.in_features, module.out_features)
            elif isinstance(module, Conv1D):
                in_features, out_features = module.weight.shape
                found[name] = BaseModule("conv1d", in_features, out_features)
            elif isinstance(module, torch.nn.Embedding):
                found[name] = BaseModule("embedding", module.num_embeddings, module.embedding_dim)
        logger.debug("base model has %d adaptable modules", len(found))
        return found

    @cached_property
    def quantized_modules(self) -> dict[str, bool]:
        """{module name: stored transposed} for every layer that loading the base with
        :func:`adaconvert.base.quantization.bnb_config` quantises.

        Decided by transformers' own rules: every ``nn.Linear`` and Conv1D (stored (in, out), so ``True``) except
        the modules its bitsandbytes quantiser keeps in full precision: the output head, tied weights, the last
        module and the class's ``_keep_in_fp32_modules``.
        """
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        model = self.meta_model
        keep = [*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or [])]
        return {
            name: isinstance(module, Conv1D)
            for name, module in model.named_modules()
            if (isinstance(module, Conv1D) or type(module) is torch.nn.Linear) and should_convert_module(name, keep)
        }

    @cached_property
    def checkpoint(self) -> Checkpoint:
        """The safetensors headers of the base's weights (:func:`adaconvert.io.checkpoint.open_checkpoint`)."""
        if self.root is None:
            raise InvalidConfigError("a base model given as a config has no weights to read", path=self.source)
        return open_checkpoint(self.root)


# Decoder families whose quantised layers follow from the config alone: every listed projection of every block
# (transformers keeps the embeddings and the head, tied or not, in full precision). model_type → (blocks' prefix,
# projections, stored transposed (Conv1D), config field with the block count). ``tests/test_qlora.py`` checks each
# entry against transformers' own decision (:attr:`BaseModel.quantized_modules`) for tied and untied heads.
_LLAMA_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
KNOWN_QUANTIZED_LAYOUTS: dict[str, tuple[str, tuple[str, ...], bool, str]] = {
    **{
        model_type: ("model.layers", _LLAMA_PROJECTIONS, False, "num_hidden_layers")
        for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "gpt2": ("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), True, "n_layer"),
}


def known_quantized_modules(config: dict) -> dict[str, bool] | None:
    """:attr:`BaseModel.quantized_modules` of a base of a family in :data:`KNOWN_QUANTIZED_LAYOUTS`, from its parsed
    config.json alone; None for any other (or a config that adds layers: GPT-2's cross-attention)."""
    known = KNOWN_QUANTIZED_LAYOUTS.get(config.get("model_type"))
    if known is None or config.get("add_cross_attention"):
        return None
    prefix, projections, transposed, count = known
    blocks = config.get(count)
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        return None
    return {f"{prefix}.{block}.{projection}": transposed for block in range(blocks) for projection in projections}


def quantized_modules(config: dict) -> dict[str, bool]:
    """:attr:`BaseModel.quantized_modules` of the base whose parsed config.json is ``config``: for the families of
    :data:`KNOWN_QUANTIZED_LAYOUTS` from the config alone, for others remembered in ``quantized-modules/`` of
    :func:`~adaconvert.io.location.cache_root`, keyed by the config and the transformers version that decided it.

    Deciding it imports transformers and builds the model on the meta device: measured 6 s on 2 cores, more than
    requantising a 2-layer Llama-8B-shaped slice takes; merging a batch of adapters onto one base pays it once.
    A cache that cannot be read or written is ignored (the answer is computed again).
    """
    import hashlib
    import importlib.metadata
    import json

    from adaconvert.io.atomic import atomic_output_file
    from adaconvert.io.location import cache_root

    known = known_quantized_modules(config)
    if known is not None:
        return known
    version = importlib.metadata.version("transformers")
    text = json.dumps([_QUANTIZED_CACHE_FORMAT, version, config], sort_keys=True)
    path = cache_root() / "quantized-modules" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(found, dict) and all(isinstance(k, str) and isinstance(v, bool) for k, v in found.items()):
            return found
    except (OSError, ValueError):
        pass
    found = BaseModel.resolve(config).quantized_modules
    try:
        with atomic_output_file(path, overwrite=True) as tmp:  # two merges at once: either one's (equal) answer
            tmp.write_text(json.dumps(found), encoding="utf-8")
    except (OSError, AdaconvertError) as exc:
        logger.debug("cannot cache the quantised modules in %s: %s", path, exc)
    return found


_QUANTIZED_CACHE_FORMAT = 1  # raise when quantized_modules' rules change: older entries are then not read


def _config_from_dict(config: dict):
    from transformers import AutoConfig

    if not config.get("model_type"):
        raise InvalidConfigError("base config has no 'model_type'")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config["model_type"], **fields)
    except (ValueError, KeyError) as exc:
        raise InvalidConfigError(f"cannot make a model config of it ({exc})") from exc
