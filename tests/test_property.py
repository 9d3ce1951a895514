"""Property: for random shapes, masks, alphas and dtypes, the converted LoRA's ΔW is PEFT's AdaLoRA ΔW."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaconvert

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class Tiny(torch.nn.Module):
    def __init__(self, in_f, out_f, conv1d):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(out_f, in_f) if conv1d else torch.nn.Linear(in_f, out_f)

    def forward(self, x):
        return self.proj(x)


def peft_adalora(in_f, out_f, init_r, alpha, mask, conv1d, dtype, seed):
    """A PEFT AdaLoRA model with random A, E, B and ``mask`` as its rank_pattern, as training would leave it."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = AdaLoraConfig(
        init_r=init_r, target_r=1, lora_alpha=alpha, target_modules=["proj"], total_step=10, fan_in_fan_out=conv1d
    )
    model = get_peft_model(Tiny(in_f, out_f, conv1d), cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for p in (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]):
            p.normal_()
        layer.lora_E["default"][~torch.tensor(mask)] = 0  # what AdaLoRA's masking does
    model.peft_config["default"].rank_pattern = {"proj.lora_E.default": mask}
    return model.to(dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    init_r=st.integers(1, 8),
    alpha=st.sampled_from([-1.0, 0.0, 1.0, 7.5, 32.0]),
    conv1d=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    data=st.data(),
)
def test_delta_weight_identity(in_f, out_f, init_r, alpha, conv1d, dtype, data):
    mask = data.draw(st.lists(st.booleans(), min_size=init_r, max_size=init_r), label="mask")
    if alpha <= 0 and any(mask) and not all(mask):
        # PEFT's reload rescales partially pruned modules when lora_alpha <= 0 (see test_to_lora); compare with the
        # trained model there, not here
        alpha = 4.0
    model = peft_adalora(in_f, out_f, init_r, alpha, mask, conv1d, dtype, seed=data.draw(st.integers(0, 2**16)))
    layer = model.base_model.model.proj
    with torch.no_grad():
        reference = layer.get_delta_weight("default").float()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "ada")
        if not any(mask):
            # nothing left anywhere: refusing to write an empty adapter is the right answer
            try:
                adaconvert.to_lora(tmp / "ada", tmp / "out")
            except adaconvert.AdaconvertError as exc:
                assert "nothing to write" in str(exc)
                return
            raise AssertionError("an adapter with no non-zero module was written")
        adaconvert.to_lora(tmp / "ada", tmp / "out")
        from peft import PeftModel

        ours = PeftModel.from_pretrained(Tiny(in_f, out_f, conv1d).to(dtype), str(tmp / "out"))
        with torch.no_grad():
            got = ours.base_model.model.proj.get_delta_weight("default").float()
    assert got.shape == reference.shape
    norm = reference.norm()
    assert float((got - reference).norm()) <= TOL[dtype] * float(norm) + 1e-30
