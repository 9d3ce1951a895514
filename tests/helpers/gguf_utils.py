"""Real llama.cpp (llama-cpp-python) in the tests: tiny bases written as GGUF, adapters swapped on one context.

The bases are written here with the ``gguf`` package from the tiny transformers checkpoints, the way
``convert_hf_to_gguf.py`` lays them out (names from gguf's tables, q/k rows permuted for llama); the tests first
prove each base against transformers before trusting it with an adapter.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import torch

from tests.helpers.needs import missing, require

# llama.cpp against transformers, both float32 (f32 weights and KV cache, one thread): max |Δlogit| on logits of
# magnitude ~3. The two sum in different orders (ggml's own kernels vs. torch's BLAS, AVX2 or AVX-512 depending on
# the CI machine): measured 2e-6 to 4e-6 on the tiny bases, with and without an adapter. 1e-4 leaves room for other
# kernels and stays far below what an adapter (~2.5) or a wrong scale (~4) moves; a wrong q/k permutation, norm
# epsilon or rope base shows as 1e-2 or more.
LOGIT_TOL = 1e-4


def require_llama_cpp():
    """Import llama_cpp; skip locally when missing, fail in CI (these tests are never skipped there)."""
    return require("llama_cpp", purpose="the llama.cpp tests")


def write_base_gguf(model_dir: str | Path, path: str | Path) -> Path:
    """Write the tiny transformers model in ``model_dir`` (llama or qwen2) as a float32 GGUF base at ``path``.

    Hyper-parameters and tensor names follow ``convert_hf_to_gguf.py`` (``LlamaModel`` / ``Qwen2Model``); the
    vocabulary is the word-level tokenizer's tokens as an SPM vocabulary (tokens are fed as ids, never tokenised).
    """
    import gguf
    from safetensors.torch import load_file

    from adaconvert.writers.gguf import gguf_base, permute_rows

    model_dir, path = Path(model_dir), Path(path)
    config = json.loads((model_dir / "config.json").read_text())
    base = gguf_base(config)
    arch = gguf.MODEL_ARCH[base.arch.upper()]
    names = gguf.get_tensor_name_map(arch, base.n_layer)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == config["vocab_size"]

    w = gguf.GGUFWriter(path, base.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(model_dir.name)
    w.add_vocab_size(config["vocab_size"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(base.n_layer)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(base.n_head)
    w.add_head_count_kv(base.n_kv_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    specials = {config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]}
    w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        if name == "lm_head.weight" and base.tied_embeddings:
            continue
        tensor = tensor.float()
        if base.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_rows(tensor, base.n_head, base.n_head)
        if base.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_rows(tensor, base.n_head, base.n_kv_head)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, name
        w.add_tensor(new_name, tensor.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class LlamaCppRunner:
    """One llama.cpp model and context (float32 KV cache, one thread); LoRA adapters swapped on it per call."""

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 64):
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=1,
            n_threads_batch=1,
            logits_all=True,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            use_mmap=False,
            verbose=False,
        )

    def logits(self, ids: list[int], adapter: str | Path | None = None, *, scale: float = 1.0) -> torch.Tensor:
        """Logits (len(ids), vocab) for one sequence, with the GGUF LoRA ``adapter`` applied if given.

        Raises:
            RuntimeError: llama.cpp refused the adapter (it logs why on stderr).
        """
        lib, llm = self._lib, self.llm
        lora = None
        if adapter is not None:
            lora = lib.llama_adapter_lora_init(llm._model.model, str(adapter).encode())
            if not lora:
                raise RuntimeError(f"llama.cpp refused the adapter {adapter}")
        try:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(lora) if lora else None
            scales = (ctypes.c_float * 1)(scale) if lora else None
            if lib.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1 if lora else 0, scales):
                raise RuntimeError(f"llama.cpp could not set the adapter {adapter}")
            llm.reset()
            llm.eval(ids)
            return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        finally:
            if lora:
                lib.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
                lib.llama_adapter_lora_free(lora)

    def close(self) -> None:
        self.llm.close()


LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36.tar.gz"


def llama_cpp_converter(workdir: str | Path) -> Path:
    """``convert_lora_to_gguf.py`` from the llama-cpp-python sdist that ``make`` keeps in ``<venv>/src`` (the
    llama.cpp our llama.cpp tests run), unpacked into ``workdir`` with its ``conversion/`` package and ``gguf-py``.

    ``LLAMA_CPP_SDIST`` names another copy of the sdist. Skips locally when there is none, fails in CI.
    """
    import sys
    import tarfile

    sdist = Path(os.environ.get("LLAMA_CPP_SDIST", Path(sys.prefix) / "src" / LLAMA_CPP_SDIST))
    if not sdist.is_file():
        missing(f"{sdist} is missing (make installs it)", purpose="the comparison with llama.cpp's converter")
    root = f"{LLAMA_CPP_SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    wanted = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/gguf/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(root) and m.name[len(root) :].startswith(wanted)]
        for m in members:
            m.name = m.name[len(root) :]
        tar.extractall(workdir, members=members, filter="data")
    return Path(workdir) / "convert_lora_to_gguf.py"


def gguf_tensors_of(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """{tensor name: (GGML type, GGML shape ne, data as float32)} of a GGUF file."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = (t.tensor_type.name, tuple(int(n) for n in t.shape), data)
    return out


def gguf_field(path: str | Path, key: str):
    """The value of one metadata key of a GGUF file (strings decoded, scalars as Python numbers)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]
