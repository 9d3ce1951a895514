"""QLoRA on CPU with the real bitsandbytes: 4-bit / int8 bases for the three methods, the requantised merge, and
the validation against PEFT on the quantised base."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import adaconvert
from adaconvert.base.model import KNOWN_QUANTIZED_LAYOUTS, BaseModel, known_quantized_modules, quantized_modules
from adaconvert.base.quantization import bnb_config, requantized
from adaconvert.cli import main
from adaconvert.demo.tiny import build_tiny_model
from tests.helpers.needs import require
from tests.helpers.training_utils import quick_train, write_jsonl

F = require("bitsandbytes.functional", purpose="the QLoRA tests")  # never skipped in CI


def held_weights(layer) -> torch.Tensor:
    """The dense weights a loaded bitsandbytes layer computes with, read back with bitsandbytes' own functions."""
    from bitsandbytes.nn import Linear4bit
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    if isinstance(layer, Linear4bit):
        data, state = layer.weight.data, layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for a CPU kernel: back to the plain layout
            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        return F.dequantize_4bit(data, state)
    return F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    build_tiny_model(root / "f32", "llama")
    build_tiny_model(root / "bf16", "llama", dtype=torch.bfloat16)
    return root


@pytest.mark.parametrize(
    ("method", "double_quant", "dtype"),
    [
        ("nf4", True, "f32"),
        ("nf4", False, "f32"),
        ("fp4", True, "f32"),
        ("nf4", True, "bf16"),
        ("int8", True, "f32"),
    ],
)
def test_requantized_is_what_the_loaded_layer_holds(bases, method, double_quant, dtype):
    base = bases / dtype
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    loaded = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch_dtype, quantization_config=bnb_config(method, double_quant=double_quant)
    )
    quantized = {n for n, m in loaded.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert (
        set(BaseModel.resolve(base).quantized_modules) == quantized and len(quantized) == 14
    )  # the head stays unquantised
    assert set(quantized_modules(json.loads((base / "config.json").read_text()))) == quantized  # what merge uses
    weights = dict(plain.named_parameters())
    layers = dict(loaded.named_modules())
    for name in sorted(quantized):
        held = held_weights(layers[name])
        # bit-exact: both sides are bitsandbytes' own element-wise (de)quantisation, no summation involved
        assert torch.equal(requantized(weights[f"{name}.weight"], method, double_quant=double_quant), held), name


def test_requantized_conv1d_quantises_the_layer_weight(tmp_path):
    build_tiny_model(tmp_path, "gpt2")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config("nf4"))
    modules = BaseModel.resolve(tmp_path).quantized_modules
    assert modules and all(modules.values())  # GPT-2's Conv1D stores (in, out)
    layers, weights = dict(loaded.named_modules()), dict(plain.named_parameters())
    for name in modules:
        stored = weights[f"{name}.weight"]
        assert torch.equal(requantized(stored, "nf4", transposed=True), held_weights(layers[name]).T), name


@pytest.mark.parametrize("model_type", sorted(KNOWN_QUANTIZED_LAYOUTS))
@pytest.mark.parametrize("tied", [False, True])
def test_known_families_quantise_what_transformers_decides(model_type, tied):
    """For the families merge decides from the config alone, the answer is transformers' own (its model built on
    the meta device, its bitsandbytes rules applied: ``BaseModel.quantized_modules``, itself checked against the
    loaded layers above), for tied and untied heads and any number of blocks."""
    for blocks in (1, 3):
        if model_type == "gpt2":
            config = {"model_type": "gpt2", "n_embd": 64, "n_layer": blocks, "n_head": 2, "vocab_size": 100}
        else:
            shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
            config = {"model_type": model_type, **shape, "head_dim": 32, "num_hidden_layers": blocks}
            config.update(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config["tie_word_embeddings"] = tied
        assert known_quantized_modules(config) == BaseModel.resolve(config).quantized_modules, (model_type, blocks)


def test_other_configs_are_left_to_transformers():
    """A family outside the table (OLMo keeps its last block's down_proj in full precision when its head is tied:
    transformers keeps the model's last parameter, and OLMo's norms have none), GPT-2 with cross-attention (more
    layers), or a config without its block count: transformers decides."""
    assert known_quantized_modules({"model_type": "olmo", "num_hidden_layers": 2}) is None
    assert known_quantized_modules({"model_type": "gpt2", "n_layer": 2, "add_cross_attention": True}) is None
    assert known_quantized_modules({"model_type": "llama"}) is None
    assert known_quantized_modules({"model_type": "llama", "num_hidden_layers": "2"}) is None


@pytest.fixture(scope="module")
def qlora(bases, tmp_path_factory):
    """LoRA on q/v only, trained on the nf4 base, converted, and merged both ways with 1 KiB row blocks (several
    blocks per tensor, two threads), so the requantised tensors are handed out block by block."""
    import adaconvert.merging as merging

    root = tmp_path_factory.mktemp("qlora-lora")
    data = write_jsonl(root / "data.jsonl")
    result = quick_train(
        "lora", bases / "f32", data, root / "lora", quantize="nf4", target_modules=["q_proj", "v_proj"]
    )
    adaconvert.to_lora(root / "lora", root / "converted")
    block_bytes = merging.BLOCK_BYTES
    merging.BLOCK_BYTES = 1024
    try:
        adaconvert.merge(bases / "f32", root / "lora", root / "plain", threads=2)
        argv = ["merge", str(bases / "f32"), str(root / "lora"), str(root / "requantized"), "--requantize", "nf4"]
        assert main([*argv, "--threads", "2", "--quiet"]) == 0
    finally:
        merging.BLOCK_BYTES = block_bytes
    return root, result


def test_qlora_lora_trains_on_4bit_layers_with_float32_adapters(qlora):
    _, result = qlora
    from bitsandbytes.nn import Linear4bit

    base = result.model.get_base_model()
    assert sum(isinstance(m, Linear4bit) for m in base.modules()) == 14
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert result.options["quantize"] == "nf4" and result.options["double_quant"] is True


def test_requantized_merge_holds_dequant_quant_w(qlora, bases):
    root, _ = qlora
    base = load_file(bases / "f32" / "model.safetensors")
    merged = load_file(root / "requantized" / "model.safetensors")
    plain = load_file(root / "plain" / "model.safetensors")
    adapter = adaconvert.read_adapter(root / "lora")
    for name, transposed in BaseModel.resolve(bases / "f32").quantized_modules.items():
        key = f"{name}.weight"
        expected = requantized(base[key], "nf4", transposed=transposed)
        if name in adapter.deltas:
            # W' = dequant(quant(W)) + B @ A: a matrix product, so equal within float32 rounding of the sum
            delta = adapter.deltas[name].delta_weight()
            torch.testing.assert_close(merged[key], expected + delta, rtol=0, atol=1e-6)
            torch.testing.assert_close(plain[key], base[key] + delta, rtol=0, atol=1e-6)
        else:  # no update: bitsandbytes' dequantisation itself, bit for bit
            assert torch.equal(merged[key], expected), key
            assert torch.equal(plain[key], base[key]), key
    for key in ("lm_head.weight", "model.embed_tokens.weight"):  # left unquantised by the loader
        assert torch.equal(merged[key], base[key])
    report = json.loads((root / "requantized" / "merge_report.json").read_text())
    assert report["requantized"] == {"method": "nf4", "double_quant": True, "tensors": 14}


@pytest.mark.slow  # CLI subprocesses, each importing torch
def test_requantising_merge_imports_neither_transformers_nor_bitsandbytes(qlora, bases, tmp_path):
    """Importing bitsandbytes sets up torch.compile and importing transformers its model classes: seconds each, more
    than the work on a small model. The requantising merge needs neither: its 4-bit loops and tables are ours,
    asserted bit for bit against bitsandbytes above, and which layers a llama base quantises follows from its config
    (other families: transformers decides once per base config, remembered). The first merge on the base, with an
    empty cache, imports neither; a second writes the same bytes."""
    root, _ = qlora
    code = (
        "import sys; from adaconvert.cli import main\n"
        "assert main(['merge', *sys.argv[1:], '--requantize', 'nf4', '-q']) == 0\n"
        "print('imported:', *[name for name in ('transformers', 'bitsandbytes') if name in sys.modules])"
    )
    outputs = [tmp_path / "first", tmp_path / "second"]
    env = {**os.environ, "ADACONVERT_CACHE": str(tmp_path / "cache")}  # an empty cache, not the developer's
    for out in outputs:
        argv = [sys.executable, "-c", code, str(bases / "f32"), str(root / "lora"), str(out)]
        run = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.splitlines()[-1] == "imported:", out.name
    first, second = (load_file(out / "model.safetensors") for out in outputs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_quantised_layers_are_remembered_per_base_config(tmp_path, monkeypatch):
    """For a family outside the table, the cache of :func:`quantized_modules` holds transformers' answer; an entry
    that cannot be read is decided again, and another config gets another entry."""
    monkeypatch.setenv("ADACONVERT_CACHE", str(tmp_path / "cache"))  # not the developer's own ~/.cache
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
    config = {"model_type": "olmo", **shape, "num_hidden_layers": 2, "vocab_size": 100, "pad_token_id": 0}
    config.update(bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    decided = BaseModel.resolve(config).quantized_modules
    assert "model.layers.1.mlp.down_proj" not in decided  # OLMo's rule that the table would get wrong
    assert quantized_modules(config) == decided and decided
    (entry,) = (tmp_path / "cache" / "quantized-modules").iterdir()
    entry.write_text(json.dumps({"marker": True}))
    assert quantized_modules(config) == {"marker": True}  # read from the entry, not decided again
    entry.write_text("{")
    assert quantized_modules(config) == decided
    other = {**config, "tie_word_embeddings": False}
    quantized_modules(other)
    assert len(list(entry.parent.iterdir())) == 2


def test_validate_against_the_4bit_base(qlora, bases, capsys):
    root, _ = qlora
    argv = ["validate", str(bases / "f32"), str(root / "lora"), str(root / "converted"), "--quantize", "nf4"]
    argv += ["--merged", str(root / "plain"), "--merged", str(root / "requantized"), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(c["subject"], c["metric"]): c for c in report["checks"]}
    faithful, plain = rows["merged:requantized", "max |Δlogit|"], rows["merged:plain", "max |Δlogit|"]
    assert faithful["limit"] is not None and faithful["passed"]  # held to the float32 tolerance
    assert plain["limit"] is None  # reported, not held: it merges into W, not what the adapter trained on
    effect = rows["converted", "adapter effect: max |Δlogit| vs base"]["value"]
    assert plain["value"] > 100 * faithful["value"] and effect > 1e-2
    assert rows["converted", "max |Δlogit|"]["passed"]
    assert any("merged:plain: a plain (W + ΔW) merge" in n for n in report["notes"])
    # against the float base the roles swap: the plain merge is the one held to the tolerances
    argv = [
        "validate",
        str(bases / "f32"),
        str(root / "lora"),
        str(root / "converted"),
        "--merged",
        str(root / "plain"),
    ]
    assert main([*argv, "--json"]) == 0
    rows = {(c["subject"], c["metric"]): c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert rows["merged", "max |Δlogit|"]["limit"] is not None and rows["merged", "max |Δlogit|"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adalora", "lora-drop"])
def test_dynamic_methods_on_a_4bit_base(bases, tmp_path, method):
    data = write_jsonl(tmp_path / "data.jsonl")
    options = {"quantize": "nf4"}
    if method == "lora-drop":
        # with checkpointing: the phase's non-reentrant checkpointing on a k-bit-prepared base
        options.update(granularity="module", keep_fraction=0.4, pilot_fraction=0.25, gradient_checkpointing=True)
    result = quick_train(method, bases / "f32", data, tmp_path / "adapter", **options)
    if method == "adalora":  # the budget really ran on 4-bit layers: ranks differ and sum to the budget
        ranks = result.ranks
        assert len(set(ranks.values())) > 1 and sum(ranks.values()) == result.rank_history["target_budget"]
    else:  # the output-importance hooks saw every module's LoRA on the quantised layers
        record = result.lora_drop
        assert all(score > 0 for score in record["module_scores"].values()) and len(record["module_scores"]) == 14
        assert len(record["kept"]) == 6
    adaconvert.to_lora(tmp_path / "adapter", tmp_path / "converted")
    report = adaconvert.validate(
        bases / "f32", tmp_path / "adapter", tmp_path / "converted", quantize="nf4", progress=False
    )
    assert report.passed


def _hard_weights(shape, dtype, seed) -> torch.Tensor:
    """Random weights whose first blocks put values exactly on, and one float32 step either side of, every 4-bit
    midpoint (absmax 1 there, so the scaled value is the weight itself), plus an all-zero block."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).reshape(-1) * 0.02
    edges = []
    for quant_type in ("nf4", "fp4"):
        mids = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))[0]
        edges += [mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))]
    edges = torch.cat(edges)
    for i, start in enumerate(range(0, min(w.numel(), edges.numel() * 2), 64)):
        block = edges[i * 63 : (i + 1) * 63]
        if block.numel() == 0 or start + 64 > w.numel():
            break
        w[start] = 1.0
        w[start + 1 : start + 1 + block.numel()] = block
    if w.numel() >= 64 * 8:
        w[64 * 7 : 64 * 8] = 0.0
    return w.reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_our_4bit_quantisation_is_bitsandbytes(method, dtype):
    """The merge's faster 4-bit quantisation (``base/fourbit.py``) gives bitsandbytes' own codes, statistics and
    dequantised weights, bit for bit: over shapes with a short last block and an odd element count, with and
    without double quantisation, in one and in several threads, with values on the midpoints between codes."""
    from adaconvert.base.quantization import quantize_4bit

    for i, shape in enumerate([(256, 1024), (64, 4100), (96, 70), (3, 21), (1, 64), (0, 64)]):
        w = _hard_weights(shape, dtype, seed=i)
        for double_quant in (True, False):
            packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=method)
            for threads in (1, 3):
                ours, our_state = quantize_4bit(w, method, double_quant=double_quant, threads=threads)
                assert torch.equal(ours, packed), (shape, double_quant, threads)
                theirs, mine = state.as_dict(packed=True), our_state.as_dict(packed=True)
                assert theirs.keys() == mine.keys()
                for key, value in theirs.items():
                    assert torch.equal(mine[key], value) if isinstance(value, torch.Tensor) else mine[key] == value, (
                        key
                    )
                if shape[-1] % 2 == 0:  # (bitsandbytes compiles its dequantisation of an odd row length: slow)
                    dense = requantized(w, method, double_quant=double_quant, threads=threads)
                    assert torch.equal(dense, F.dequantize_4bit(packed, state))
                    copy = w.clone()  # written over by the merge's in-place form: the same numbers
                    again = requantized(copy, method, double_quant=double_quant, threads=threads, in_place=True)
                    assert torch.equal(again, dense)


def test_our_4bit_tables_are_bitsandbytes():
    """The code books, midpoints, 8-bit dynamic map and double quantisation that the merge uses without importing
    bitsandbytes are bitsandbytes' own, bit for bit."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    from adaconvert.base import fourbit

    for quant_type in ("nf4", "fp4"):
        assert torch.equal(fourbit.code_book(quant_type), F.get_4bit_type(quant_type, device="cpu"))
        bounds, order, values = fourbit._tables(quant_type)
        theirs, their_order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        assert torch.equal(bounds, theirs) and torch.equal(order.long(), their_order)
        assert torch.equal(values, F.get_4bit_type(quant_type, device="cpu")[their_order])
    assert torch.equal(fourbit.dynamic_map(), F.create_dynamic_map())
    assert fourbit._native_library() is not None  # else the test below would compare bitsandbytes with itself
    g = torch.Generator().manual_seed(0)
    for n in (1, 255, 256, 1000, 70000, 200000):  # (the last two: chunks shared by threads)
        absmax = torch.rand(n, generator=g) * 0.05
        offset = absmax.mean()
        expected = F.dequantize_blockwise(*F.quantize_blockwise(absmax - offset, blocksize=256)) + offset
        for threads in (1, 3):
            assert torch.equal(fourbit.double_quantized(absmax, threads=threads), expected), (n, threads)


def test_4bit_quantisation_of_non_finite_weights_is_bitsandbytes():
    """A block holding NaN or Inf has no table cell: bitsandbytes quantises that tensor itself."""
    w = torch.randn(64, 128) * 0.02
    w[3, 5], w[40, 7] = float("nan"), float("inf")
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = requantized(w, "nf4", threads=2)
    theirs = F.dequantize_4bit(packed, state)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())


def test_int8_base(bases, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl")
    quick_train("lora", bases / "f32", data, tmp_path / "lora", quantize="int8", steps=6)
    adaconvert.to_lora(tmp_path / "lora", tmp_path / "converted")
    report = adaconvert.validate(
        bases / "f32", tmp_path / "lora", tmp_path / "converted", quantize="int8", progress=False
    )
    assert report.passed
    with pytest.raises(adaconvert.AdaconvertError, match=r"int8 .* also quantises activations"):
        adaconvert.merge(bases / "f32", tmp_path / "lora", tmp_path / "merged", requantize="int8")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quantize", "nf4", "--fsdp"], "--quantize nf4 and FSDP cannot be combined"),
        (["--quantize", "q3"], "Invalid value for '--quantize'"),
    ],
)
def test_train_refuses_bad_quantize(bases, tmp_path, argv, message, capsys):
    out = tmp_path / "out"
    common = ["train", "lora", "--model", str(bases / "f32"), "--data", str(tmp_path / "d.jsonl"), "--output"]
    assert main([*common, str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and not out.exists()


def test_quantize_without_bitsandbytes_is_one_line_before_any_model(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it: the import fails
    empty = tmp_path / "no-model"
    empty.mkdir()  # nothing to load: a model load would fail with another message
    out = tmp_path / "out"
    argv = ["train", "lora", "--model", str(empty), "--data", str(tmp_path / "d.jsonl"), "--output", str(out)]
    assert main([*argv, "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"--quantize nf4 needs bitsandbytes \(pip install", err)
    assert not out.exists()


def test_quantize_under_accelerate_fsdp_is_refused(bases, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch --use_fsdp` counts as --fsdp
    with pytest.raises(adaconvert.AdaconvertError, match="--quantize nf4 and FSDP cannot be combined"):
        quick_train("lora", bases / "f32", tmp_path / "d.jsonl", tmp_path / "out", quantize="nf4")
    assert not (tmp_path / "out").exists()


# --- what a QLoRA command prints besides its own output (real stderr: the CLI in a subprocess) --------------------

BNB_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward"
BNB_INT8_CAST = "MatMul8bitLt: inputs will be cast"


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaconvert.cli", *map(str, argv)], capture_output=True, text=True)


def _no_exit_noise(stderr: str) -> None:
    assert "nanobind" not in stderr and "leaked" not in stderr, stderr[-2000:]


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_quiet_qlora_commands_print_nothing(qlora, bases, tmp_path):
    root, _ = qlora
    for argv in (
        ["merge", bases / "f32", root / "lora", tmp_path / "merged", "--requantize", "nf4"],
        ["validate", bases / "f32", root / "lora", root / "converted", "--quantize", "nf4"],
    ):
        run = _cli(*argv, "-q")
        assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_bitsandbytes_warns_once_after_our_output(qlora, bases, tmp_path):
    """Without -q, each bitsandbytes warning once (it logs the int8 one on every matmul), after our own lines."""
    root, _ = qlora
    data = write_jsonl(tmp_path / "data.jsonl")
    merge = _cli("merge", bases / "f32", root / "lora", tmp_path / "merged", "--requantize", "nf4")
    train = _cli(
        "train", "lora-drop", "--model", bases / "f32", "--data", data, "--output", tmp_path / "int8", "--quantize",
        "int8", "--steps", "6", "--batch-size", "8", "--max-length", "16",
    )  # fmt: skip
    for run, warnings in ((merge, [BNB_CPU_KERNEL]), (train, [BNB_CPU_KERNEL, BNB_INT8_CAST])):
        assert run.returncode == 0, run.stderr[-2000:]
        lines = run.stderr.splitlines()
        ours = max(i for i, line in enumerate(lines) if "INFO adaconvert." in line)
        for warning in warnings:
            found = [i for i, line in enumerate(lines) if warning in line]
            assert len(found) <= 1 and all(i > ours for i in found), run.stderr[-3000:]
        _no_exit_noise(run.stderr)
    assert any(BNB_INT8_CAST in line for line in train.stderr.splitlines())  # on every matmul before: now once


@pytest.mark.slow  # a CLI subprocess or worker processes, each importing torch: seconds
def test_commands_run_in_one_process_leave_no_leak_report_at_exit(qlora, bases, tmp_path):
    """main() called twice in one process (a script, a notebook): triton, loaded by bitsandbytes in the first
    command, is not frozen by the second, so nothing is left alive for nanobind to report at exit."""
    root, _ = qlora
    code = (
        "import sys; from adaconvert.cli import main\n"
        "assert main(['merge', sys.argv[1], sys.argv[2], sys.argv[3], '--requantize', 'nf4', '-q']) == 0\n"
        "assert main(['to-lora', sys.argv[2], sys.argv[4], '-q']) == 0\n"
    )
    argv = [bases / "f32", root / "lora", tmp_path / "merged", tmp_path / "converted"]
    run = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
