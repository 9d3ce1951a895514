"""The adaptable modules of a base model, read from its config alone: names and shapes, no weights loaded.

The model is instantiated on the ``meta`` device, so this costs neither memory nor a download of weights. Both the
validators (a module that matches nothing in the base is silently ignored by vLLM) and the static vLLM check use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.constants import MODEL_CONFIG_NAME
from adaconvert.errors import InvalidConfigError, SourceNotFoundError
from adaconvert.io.location import is_hub_id
from adaconvert.io.source import read_json

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


def load_base_config(base):
    """A transformers config from a model directory, a ``config.json`` path, a Hub model id, a dict or a config object.

    Raises:
        SourceNotFoundError: the directory or file does not exist.
        InvalidConfigError: transformers cannot make a config of it.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(base, PretrainedConfig):
        return base
    if isinstance(base, dict):
        if not base.get("model_type"):
            raise InvalidConfigError("base config has no 'model_type'")
        fields = {k: v for k, v in base.items() if k != "model_type"}
        try:
            return AutoConfig.for_model(base["model_type"], **fields)
        except (ValueError, KeyError) as exc:
            raise InvalidConfigError(f"cannot make a model config of it ({exc})") from exc
    path = Path(base)
    if path.is_file():
        path = path.parent
    if is_hub_id(base):
        try:  # a Hub model id: only its config.json is fetched (or read from the cache)
            return AutoConfig.from_pretrained(str(base))
        except (OSError, ValueError) as exc:
            raise SourceNotFoundError(f"no such directory, and no Hub model config ({exc})", path=base) from exc
    if not (path / MODEL_CONFIG_NAME).is_file():
        raise SourceNotFoundError("no config.json: expected a base model directory", path=path)
    text_config = read_json(path / MODEL_CONFIG_NAME).get("text_config", {})  # hostile JSON: one line, not a traceback
    if not isinstance(text_config, dict | None):
        raise InvalidConfigError("field 'text_config' must be an object", path=path / MODEL_CONFIG_NAME)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidConfigError(f"cannot read the base model config ({exc})", path=path / MODEL_CONFIG_NAME) from exc


def base_modules(base) -> dict[str, BaseModule]:
    """``{module name: BaseModule}`` for every Linear, Conv1D and Embedding of the base model.

    Names are those PEFT uses after ``base_model.model.`` (``model.layers.0.self_attn.q_proj``).

    Args:
        base: model directory, its ``config.json``, a config dict or a transformers ``PretrainedConfig``.

    Raises:
        SourceNotFoundError, InvalidConfigError: see :func:`load_base_config`.

    Example:
        >>> mods = base_modules("models/tiny-llama")
        >>> mods["model.layers.0.self_attn.q_proj"]
        BaseModule(kind='linear', in_features=64, out_features=64)
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = load_base_config(base)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise InvalidConfigError(f"cannot build a causal LM from the base config ({exc})", path=str(base)) from exc
    found: dict[str, BaseModule] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found[name] = BaseModule("linear", module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            found[name] = BaseModule("conv1d", in_features, out_features)
        elif isinstance(module, torch.nn.Embedding):
            found[name] = BaseModule("embedding", module.num_embeddings, module.embedding_dim)
    logger.debug("base model has %d adaptable modules", len(found))
    return found
