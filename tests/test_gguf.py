"""GGUF export (`to-gguf`) against real llama.cpp (llama-cpp-python) and real PEFT.

First each tiny base, written as GGUF, is proven against transformers; then llama.cpp(base + our GGUF) must equal
PEFT(original adapter) within the same tolerance, and a GGUF that carries the compact layout's ``lora_alpha = R``
(what llama.cpp's own converter copies) must be wrong by exactly the per-module factors R / r_m.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.cli import main
from adaconvert.compat.runtimes import check_runtimes, llama_cpp_scale_factors, read_facts
from adaconvert.conversion.gguf import load_gguf_base, to_gguf
from adaconvert.conversion.peft_lora import to_lora
from adaconvert.conversion.pipeline import prepare_conversion
from adaconvert.conversion.report import gguf_side_files
from adaconvert.errors import AdapterShapeError, InvalidConfigError, OutputExistsError, SourceNotFoundError
from adaconvert.writers.gguf import write_gguf_lora
from tests.helpers.gguf_utils import (
    LOGIT_TOL,
    LlamaCppRunner,
    gguf_field,
    gguf_tensors_of,
    llama_cpp_converter,
    require_llama_cpp,
    write_base_gguf,
)
from tests.helpers.peft_utils import adalora_config, base_logits, peft_logits, train_peft

pytestmark = pytest.mark.llama_cpp

ARCHS = ("llama", "qwen2")
# fixed token ids (no tokenizer involved, so llama.cpp and PEFT see the same input); no BOS is added by llama.cpp
IDS = [2, 5, 9, 13, 4, 7, 21, 30, 11, 6, 8, 17]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_qwen2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module")
def runners(bases, tmp_path_factory):
    """One llama.cpp model + context per base (written as GGUF here), shared by every test of this module."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("gguf-bases")
    made = {arch: LlamaCppRunner(write_base_gguf(base, root / f"{arch}.gguf")) for arch, base in bases.items()}
    yield made
    for runner in made.values():
        runner.close()


@pytest.fixture(scope="module")
def adaloras(adalora_llama, tiny_qwen2, tmp_path_factory):
    """Real PEFT-trained AdaLoRAs, budgeted to the end (pruned ranks, rank-0 modules), per architecture."""
    cfg = adalora_config("qwen2", total_step=30)
    out = tmp_path_factory.mktemp("gguf-adalora-qwen2")
    qwen2 = train_peft(tiny_qwen2, out, cfg, steps=30, seed=0, adalora=True)
    return {"llama": adalora_llama, "qwen2": qwen2}


def reference(base, adapter) -> torch.Tensor:
    return peft_logits(base, adapter, torch.tensor([IDS]))[0]


# ---------------------------------------------------------------------------------------------- llama.cpp


@pytest.mark.parametrize("arch", ARCHS)
def test_base_gguf_matches_transformers(arch, bases, runners):
    got = runners[arch].logits(IDS)
    want = base_logits(bases[arch], torch.tensor([IDS]))[0]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_adapter_matches_peft(arch, bases, runners, adaloras, tmp_path):
    src = adaloras[arch]
    report = to_gguf(src, tmp_path / "a.gguf", base=bases[arch])
    ranks = {m.rank_after for m in report.modules}
    assert 0 in ranks and len(ranks - {0}) > 1, "the fixture must have pruned, rank-varying modules"
    assert report.removed_modules

    want = reference(bases[arch], src)
    effect = (want - base_logits(bases[arch], torch.tensor([IDS]))[0]).abs().max()
    assert effect > 0.1, "the adapter must move the logits for the comparison to mean anything"
    got = runners[arch].logits(IDS, tmp_path / "a.gguf")
    assert (got - want).abs().max() <= LOGIT_TOL


def test_gguf_from_lora_with_patterns_and_from_to_lora_output(bases, runners, lora_variants, tmp_path):
    """Every source to-lora reads: a LoRA with rank/alpha patterns, and a to-lora output (compact layout)."""
    src = lora_variants["patterns"]
    to_lora(src, tmp_path / "lora")
    want = reference(bases["llama"], src)
    for i, source in enumerate((src, tmp_path / "lora")):
        to_gguf(source, tmp_path / f"{i}.gguf", base=bases["llama"])
        assert (runners["llama"].logits(IDS, tmp_path / f"{i}.gguf") - want).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_compact_alpha_is_mis_scaled_by_predicted_factors(arch, bases, runners, adaloras, tmp_path):
    """The compact layout's ``lora_alpha = R`` in a GGUF (as llama.cpp's converter copies it) is loudly wrong, and
    wrong by exactly the factors the portability check predicts for llama.cpp (R / r_m per module): dividing each
    module's B by its predicted factor makes it exact again."""
    src = adaloras[arch]
    to_lora(src, tmp_path / "compact")
    config = json.loads((tmp_path / "compact" / "adapter_config.json").read_text())
    adapter = prepare_conversion(tmp_path / "compact").adapter
    factors = llama_cpp_scale_factors(read_facts(tmp_path / "compact"))
    assert factors == pytest.approx({m: config["lora_alpha"] / r for m, r in adapter.ranks.items()})
    assert max(factors.values()) / min(factors.values()) > 1, "ranks must vary for the factors to differ"
    verdict = check_runtimes(tmp_path / "compact", runtimes=["llama.cpp"])["llama.cpp"]
    assert verdict.status == "wrong-scale"
    base = load_gguf_base(bases[arch])
    want = reference(bases[arch], src)

    write_gguf_lora(adapter, tmp_path / "as-converted.gguf", base=base, alpha=config["lora_alpha"])
    wrong = (runners[arch].logits(IDS, tmp_path / "as-converted.gguf") - want).abs().max()
    assert wrong > 100 * LOGIT_TOL

    corrected = adapter.replace(deltas={m: LowRankDelta(A=d.A, B=d.B / factors[m]) for m, d in adapter.deltas.items()})
    write_gguf_lora(corrected, tmp_path / "corrected.gguf", base=base, alpha=config["lora_alpha"])
    assert (runners[arch].logits(IDS, tmp_path / "corrected.gguf") - want).abs().max() <= LOGIT_TOL


@pytest.mark.slow  # the converter is a fresh process that imports torch and transformers: ~10 s a run
@pytest.mark.parametrize(("arch", "layout"), [("llama", "compact"), ("qwen2", "compact"), ("llama", "uniform")])
def test_same_tensors_as_llama_cpp_converter(arch, layout, bases, runners, adaloras, tmp_path):
    """llama.cpp's own convert_lora_to_gguf.py, run on our to-lora output of the same adapter.

    compact: the same tensors as ours, name by name, type, shape and value (q/k rows permuted the same way); only
    adapter.lora.alpha differs: it copies lora_alpha = R (the mis-scaled case above). uniform: ours plus the fully
    pruned modules (the uniform layout writes them as zeros), ranks padded to R, alpha R: llama.cpp's scale R / R
    is 1, and it is exact as well.
    """
    import subprocess
    import sys

    converter = llama_cpp_converter(tmp_path / "llama.cpp")
    to_gguf(adaloras[arch], tmp_path / "ours.gguf", base=bases[arch])
    ours = gguf_tensors_of(tmp_path / "ours.gguf")
    to_lora(adaloras[arch], tmp_path / layout, layout=layout)
    out = tmp_path / f"{layout}.gguf"
    cmd = [sys.executable, str(converter), str(tmp_path / layout), "--base", str(bases[arch]), "--outfile", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    theirs = gguf_tensors_of(out)
    zeros = {n for n, (_, _, data) in theirs.items() if n.endswith("lora_b") and not np.any(data)}
    zeros |= {n.replace("lora_b", "lora_a") for n in zeros}
    assert sorted(ours) == sorted(theirs if layout == "compact" else set(theirs) - zeros)
    assert gguf_field(out, "general.architecture") == gguf_field(tmp_path / "ours.gguf", "general.architecture")
    rank = json.loads((tmp_path / layout / "adapter_config.json").read_text())["r"]
    assert gguf_field(out, "adapter.lora.alpha") == rank
    if layout == "compact":
        for name, (kind, shape, data) in ours.items():
            assert theirs[name][:2] == (kind, shape), name
            assert np.array_equal(theirs[name][2], data), name
    else:
        # GGML shapes: lora_a ne = (in, r), lora_b ne = (r, out)
        assert all(shape[1 if n.endswith("lora_a") else 0] == rank for n, (_, shape, _) in theirs.items())
        got = runners[arch].logits(IDS, out)
        assert (got - reference(bases[arch], adaloras[arch])).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_half_outtypes_load_and_stay_close(outtype, bases, runners, adaloras, tmp_path):
    """f16 / bf16 GGUFs load; their error is the factors' rounding (bf16: 8 bits of mantissa, ~4e-3 relative per
    factor), so the bound is loose but far below the adapter's own effect (> 0.1)."""
    to_gguf(adaloras["llama"], tmp_path / "h.gguf", base=bases["llama"], outtype=outtype)
    got = runners["llama"].logits(IDS, tmp_path / "h.gguf")
    assert (got - reference(bases["llama"], adaloras["llama"])).abs().max() <= 5e-2


def test_q8_0_in_llama_cpp(bases, runners, tmp_path):
    """A LoRA whose ranks and widths are all multiples of 32 (here r = 32, untrained random factors) is written as
    q8_0 and computes PEFT's function in llama.cpp up to the 8-bit rounding of its factors."""
    random_lora(bases["llama"], tmp_path / "lora", r=32, lora_alpha=4)
    want = reference(bases["llama"], tmp_path / "lora")
    effect = (want - base_logits(bases["llama"], torch.tensor([IDS]))[0]).abs().max()
    for outtype in ("f32", "q8_0"):
        to_gguf(tmp_path / "lora", tmp_path / f"{outtype}.gguf", base=bases["llama"], outtype=outtype)
        error = (runners["llama"].logits(IDS, tmp_path / f"{outtype}.gguf") - want).abs().max()
        # q8_0 rounds each factor to 1/254 of its block's range, and llama.cpp rounds the activations it multiplies
        # with them to 8 bits as well: measured 1.1% of the adapter's effect (5e-3 of 0.5); 5% still tells it from
        # any scale error (a factor of 2 or more on some module)
        assert error <= (LOGIT_TOL if outtype == "f32" else 0.05 * effect)


def random_lora(base, out, *, r: int, lora_alpha: float, seed: int = 0):
    """A PEFT LoRA on every projection with random (untrained) A and B, as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    from tests.helpers.peft_utils import TARGETS, load_base

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS["llama"], init_lora_weights=False)
    get_peft_model(load_base(base), config).save_pretrained(str(out))
    return out


def test_mistral_base_is_llama_in_gguf(tmp_path):
    """HF Mistral goes through llama.cpp's LlamaModel converter: GGUF architecture llama, q/k rows permuted. A tiny
    Mistral (GQA) base and a LoRA on it: llama.cpp equals transformers, then PEFT."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from adaconvert.demo.tiny import build_tokenizer, tiny_config

    tok = build_tokenizer(tmp_path / "mistral")
    llama = tiny_config("llama", vocab_size=len(tok)).to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    keep += ("head_dim", "vocab_size", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
    config = MistralConfig(**{k: llama[k] for k in keep})
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "mistral"))
    base = tmp_path / "mistral"
    assert load_gguf_base(base).arch == "llama" and load_gguf_base(base).permute_qk
    runner = LlamaCppRunner(write_base_gguf(base, tmp_path / "mistral.gguf"))
    try:
        plain = base_logits(base, torch.tensor([IDS]))[0]
        assert (runner.logits(IDS) - plain).abs().max() <= LOGIT_TOL
        lora = random_lora(base, tmp_path / "lora", r=4, lora_alpha=2)
        to_gguf(lora, tmp_path / "lora.gguf", base=base)
        want = reference(base, lora)
        assert (want - plain).abs().max() > 0.1
        assert (runner.logits(IDS, tmp_path / "lora.gguf") - want).abs().max() <= LOGIT_TOL
    finally:
        runner.close()


# ---------------------------------------------------------------------------------------------- files and errors


def test_outputs_card_and_report(bases, adaloras, tmp_path):
    dst = tmp_path / "out" / "ada.gguf"
    report = to_gguf(adaloras["llama"], dst, base=bases["llama"])
    report_path, card_path = gguf_side_files(dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["ada.README.md", "ada.gguf", "ada.report.json"]
    assert json.loads(report_path.read_text()) == json.loads(json.dumps(report.to_dict()))
    assert report.bytes_after == dst.stat().st_size and report.layout == "gguf" and report.dtype == "f32"
    card = card_path.read_text()
    assert "llama-server -m BASE.gguf --lora ada.gguf" in card
    assert "FROM ./BASE.gguf" in card and "ADAPTER ./ada.gguf" in card

    assert gguf_field(dst, "general.type") == "adapter" and gguf_field(dst, "adapter.type") == "lora"
    assert gguf_field(dst, "general.architecture") == "llama" and gguf_field(dst, "adapter.lora.alpha") == 0.0


def test_cli_json_and_refusals(bases, adaloras, tiny_gpt2, adalora_gpt2, tmp_path, capsys):
    dst = tmp_path / "a.gguf"
    src, base = str(adaloras["llama"]), str(bases["llama"])
    assert main(["to-gguf", src, str(dst), "--base", base, "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "gguf"
    before = dst.read_bytes()

    cases = [
        # (arguments, exit code, message fragment)
        ([src, str(dst), "--base", base], 4, "already exists"),
        ([src, str(tmp_path / "q.gguf"), "--base", base, "--outtype", "q8_0"], 2, "rows in blocks of 32"),
        ([str(adalora_gpt2), str(tmp_path / "g.gguf"), "--base", str(tiny_gpt2)], 2, "llama, mistral, qwen2"),
        ([src, str(tmp_path / "n.gguf"), "--base", str(tmp_path)], 3, "config.json"),
        ([src, str(tmp_path / "x.bin")], 2, "must be a .gguf file"),
    ]
    for args, code, fragment in cases:
        assert main(["to-gguf", *args]) == code, args
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.README.md", "a.gguf", "a.report.json"]

    assert main(["to-gguf", src, str(dst), "--base", base, "--overwrite", "--quiet", "--outtype", "f16"]) == 0
    assert dst.stat().st_size < len(before)


def test_atomic_output_file(tmp_path):
    from adaconvert.io.atomic import atomic_output_file

    dst = tmp_path / "f.gguf"
    with pytest.raises(RuntimeError), atomic_output_file(dst, overwrite=False) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert not list(tmp_path.iterdir())
    with pytest.raises(OutputExistsError), atomic_output_file(dst, overwrite=False) as tmp:
        tmp.write_bytes(b"new")
        dst.write_bytes(b"someone else's")  # appears while we write
    assert dst.read_bytes() == b"someone else's" and [p.name for p in tmp_path.iterdir()] == ["f.gguf"]
    with atomic_output_file(dst, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert dst.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.gguf"]
    assert dst.stat().st_mode & 0o777 == 0o644


def test_modules_without_a_gguf_name_are_refused_by_name(bases, adaloras):
    adapter = prepare_conversion(adaloras["qwen2"]).adapter
    base = load_gguf_base(bases["qwen2"])
    for module in ("lm_head", "model.embed_tokens"):  # qwen2's lm_head is tied to the embeddings
        d = LowRankDelta(A=torch.ones(2, 64), B=torch.ones(64, 2))
        bad = adapter.replace(deltas={**adapter.deltas, module: d})
        with pytest.raises(InvalidConfigError, match=module.replace(".", r"\.")):
            write_gguf_lora(bad, "/nonexistent/never-written.gguf", base=base)


def test_q8_0_where_every_row_fits(bases, tmp_path):
    """q8_0 needs rank and input width multiples of 32; an adapter of rank 32 is written and reads back."""
    import gguf

    base = load_gguf_base(bases["llama"])
    adapter = Adapter({"model.layers.0.mlp.up_proj": LowRankDelta(A=torch.randn(32, 64), B=torch.randn(128, 32))})
    write_gguf_lora(adapter, tmp_path / "q.gguf", base=base, outtype="q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    a = tensors["blk.0.ffn_up.weight.lora_a"]
    assert a.tensor_type == gguf.GGMLQuantizationType.Q8_0 and list(a.shape) == [64, 32]
    deq = torch.from_numpy(gguf.quants.dequantize(a.data, a.tensor_type).copy()).reshape(32, 64)
    # q8_0: 8-bit values per block of 32 with one f16 scale: at most half a step, |x|max / 127 / 2, per element
    want = adapter.deltas["model.layers.0.mlp.up_proj"].A
    assert (deq - want).abs().max() <= want.abs().max() / 127


def test_written_file_is_the_same_over_an_existing_file(bases, tmp_path):
    """The writer opens the empty temporary file it is handed without truncating it (so that ext4 does not flush it
    on close), and any other existing file as "wb": over either, the bytes are those of a fresh file."""
    base = load_gguf_base(bases["llama"])
    adapter = Adapter({"model.layers.0.mlp.up_proj": LowRankDelta(A=torch.randn(4, 64), B=torch.randn(128, 4))})
    write_gguf_lora(adapter, tmp_path / "fresh.gguf", base=base, name="x")
    (tmp_path / "empty.gguf").touch()
    (tmp_path / "longer.gguf").write_bytes(b"\xff" * (2 * (tmp_path / "fresh.gguf").stat().st_size))
    for name in ("empty.gguf", "longer.gguf"):
        write_gguf_lora(adapter, tmp_path / name, base=base, name="x")
        assert (tmp_path / name).read_bytes() == (tmp_path / "fresh.gguf").read_bytes(), name


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_same_bytes_as_gguf_s_own_writer(outtype, bases, adaloras, tmp_path):
    """Our GGUF writer (``io.gguf_file``) writes what gguf's ``GGUFWriter``, llama.cpp's own, writes for the same
    keys and tensors: byte for byte, header, alignment and the f16 / bf16 / q8_0 encodings included (both round
    element by element, no summation: bit-exact on any CPU). A trained adapter for the float types (pruned ranks,
    q/k rows permuted); for q8_0 one whose rows are multiples of 32."""
    import gguf

    base = load_gguf_base(bases["llama"])
    if outtype == "q8_0":
        g = torch.Generator().manual_seed(0)
        deltas = {
            f"model.layers.{i}.self_attn.{m}": LowRankDelta(A=torch.randn(32, 64, generator=g), B=torch.randn(n, 32))
            for i in range(2)
            for m, n in (("q_proj", 64), ("k_proj", 32))
        }
        adapter = Adapter(deltas)
    else:
        adapter = prepare_conversion(adaloras["llama"]).adapter
    tensors = write_gguf_lora(adapter, tmp_path / "ours.gguf", base=base, outtype=outtype, name="x")
    assert any(t.heads for t in tensors)  # the permuted path is covered

    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    writer = gguf.GGUFWriter(tmp_path / "theirs.gguf", base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    writer.add_name("x")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    data = [gguf.quants.quantize(t.whole().numpy(), qtype) for t in tensors]
    for tensor, array in zip(tensors, data, strict=True):
        writer.add_tensor_info(tensor.name, array.shape, array.dtype, array.nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in data:
        writer.write_tensor_data(array)
    writer.close()
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_names_are_gguf_s_own(arch, tied):
    """Every module of the HF model (and a block past the last) gets the name gguf's ``TensorNameMap`` gives it when
    that tensor is one a LoRA adapts in llama.cpp, and no name otherwise."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from adaconvert.writers.gguf import gguf_base

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
    config = AutoConfig.for_model(arch, **shape, num_hidden_layers=3, vocab_size=100, tie_word_embeddings=tied)
    base = gguf_base(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[base.arch.upper()], base.n_layer)
    adaptable = {"ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_GATE", "FFN_UP", "FFN_DOWN", "OUTPUT"}
    past = ["model.layers.3.self_attn.q_proj", "model.layers.01.mlp.up_proj"]  # no such block; not a block's name
    modules = [name for name, _ in model.named_modules() if name] + past
    assert "lm_head" in modules
    for module in modules:
        found = names.get_type_and_name(f"{module}.weight", try_suffixes=(".weight",))
        want = found[1] if found and found[0].name in adaptable and not (tied and found[0].name == "OUTPUT") else None
        assert base.tensor_name(module) == want, module


def test_error_types(bases, adaloras, tmp_path):
    with pytest.raises(SourceNotFoundError):
        to_gguf(adaloras["llama"], tmp_path / "a.gguf", base=tmp_path / "nope")
    with pytest.raises(AdapterShapeError):
        to_gguf(adaloras["llama"], tmp_path / "a.gguf", base=bases["llama"], outtype="q8_0")
    assert not list(tmp_path.iterdir())
    (tmp_path / "b.gguf").write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        to_gguf(adaloras["llama"], tmp_path / "b.gguf")
    assert (tmp_path / "b.gguf").read_bytes() == b"keep"


def test_base_defaults_to_the_adapter_s_and_may_be_a_hub_id(bases, adaloras, tmp_path, monkeypatch, capsys):
    """No --base: the adapter's base_model_name_or_path (here the tiny base's path). A Hub id: only config.json is
    needed, here served by huggingface_hub from an offline cache that holds nothing else."""
    to_gguf(adaloras["llama"], tmp_path / "default" / "a.gguf")
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_bytes((bases["llama"] / "config.json").read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    to_gguf(adaloras["llama"], tmp_path / "a.gguf", base="acme/tiny-llama")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "default" / "a.gguf").read_bytes()
    assert main(["to-gguf", str(adaloras["llama"]), str(tmp_path / "x.gguf"), "--base", "acme/missing"]) == 3
    err = capsys.readouterr().err.strip()
    assert "acme/missing" in err and len(err.splitlines()) == 1
