"""The safe export layout's config under PEFT's own pattern matching, including awkward module names."""

from __future__ import annotations

import torch

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.writers import write_peft_lora


class Nested(torch.nn.Module):
    """``encoder.fc`` is a dotted suffix of ``vision.encoder.fc``: PEFT's first-key-wins rule could give the deeper
    module the shallower one's rank if the keys came in the wrong order."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.fc = torch.nn.Linear(6, 5)
        self.vision = torch.nn.Module()
        self.vision.encoder = torch.nn.Module()
        self.vision.encoder.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.encoder.fc(x) + self.vision.encoder.fc(x)


def test_suffix_module_names_keep_their_own_rank(tmp_path):
    from peft import PeftModel

    g = torch.Generator().manual_seed(0)
    deltas = {
        "encoder.fc": LowRankDelta(A=torch.randn(1, 6, generator=g), B=torch.randn(5, 1, generator=g)),
        "vision.encoder.fc": LowRankDelta(A=torch.randn(3, 6, generator=g), B=torch.randn(5, 3, generator=g)),
    }
    write_peft_lora(Adapter(deltas=deltas), tmp_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(Nested(), str(tmp_path))
    for name, delta in deltas.items():
        layer = model.base_model.model.get_submodule(name)
        assert layer.r["default"] == delta.rank
        assert layer.scaling["default"] == 1.0
        assert torch.allclose(layer.get_delta_weight("default"), delta.B @ delta.A)
