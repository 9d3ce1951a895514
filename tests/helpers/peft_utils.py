"""Ground truth from PEFT itself: train real adapters, and read ΔW and logits back through PEFT.

Exactness is always checked against these, never against adaconvert's own formulas.
"""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).eval()


def training_batch(base_dir: str | Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from adaconvert.demo.tiny import SENTENCES

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    return dict(tok(SENTENCES, return_tensors="pt", padding=True))


def train_peft(
    base_dir,
    out_dir,
    peft_config,
    *,
    steps: int,
    seed: int = 0,
    lr: float = 2e-2,
    adalora: bool = False,
    keep=False,
    before_save=None,
):
    """Train ``peft_config`` on the tiny sentences with a plain loop, the AdaLoRA way when ``adalora``:
    ``update_and_allocate(step)`` after ``optimizer.step()`` and before ``zero_grad()``. Saves to ``out_dir``;
    returns it, or (out_dir, trained PeftModel in eval mode) with ``keep``. ``before_save(model)`` runs before
    saving."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir).train(), peft_config)
    batch = training_batch(base_dir)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        if adalora:
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
    if before_save is not None:
        before_save(model)
    model.save_pretrained(str(out_dir))
    return (out_dir, model.eval()) if keep else out_dir


def peft_model(base_dir, adapter_dir, dtype: torch.dtype = torch.float32):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir, dtype), str(adapter_dir)).eval()


def peft_delta_weights(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """{module name: ΔW as PEFT's ``get_delta_weight`` computes it}, for every adapted module (rank 0 included).

    ΔW is in the base weight's own layout (transposed for Conv1D / fan_in_fan_out)."""
    model = peft_model(base_dir, adapter_dir)
    prefix = "base_model.model."
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            with torch.no_grad():
                out[name.removeprefix(prefix)] = module.get_delta_weight("default").float()
    return out


def prompt_ids(base_dir, n: int = 4) -> torch.Tensor:
    """A few real token sequences (not only the training sentences) for logit comparisons."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    prompts = ["the lazy fox writes a token", "every adapter keeps its rank", "layers are removed", "a model reads"]
    return tok(prompts[:n], return_tensors="pt", padding=True)["input_ids"]


@torch.no_grad()
def peft_logits(base_dir, adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    return peft_model(base_dir, adapter_dir)(ids).logits


@torch.no_grad()
def base_logits(base_dir, ids: torch.Tensor) -> torch.Tensor:
    return load_base(base_dir)(ids).logits


def max_rel_delta_error(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """max over modules of ‖ΔW_ref − ΔW_other‖/‖ΔW_ref‖, a module missing from ``other`` counting as ΔW = 0.

    A module in ``other`` but not in ``reference`` is an error (it would be a module we invented)."""
    extra = set(other) - set(reference)
    assert not extra, f"modules not in the reference: {sorted(extra)}"
    worst = 0.0
    for name, ref in reference.items():
        got = other.get(name, torch.zeros_like(ref))
        norm = ref.norm()
        if norm == 0:
            assert got.abs().max() == 0, f"{name}: reference ΔW is zero but ours is not"
            continue
        worst = max(worst, float((ref - got).norm() / norm))
    return worst


@torch.no_grad()
def peft_greedy(base_dir, adapter_dir, prompts: list[list[int]], *, max_tokens: int = 8):
    """[(token ids, logprob of each chosen token)] for greedy decoding with PEFT, one prompt at a time (no padding).

    ``adapter_dir`` None runs the base model."""
    model = peft_model(base_dir, adapter_dir) if adapter_dir else load_base(base_dir)
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            nxt = int(logp.argmax())
            tokens.append(nxt)
            logprobs.append(float(logp[nxt]))
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        results.append((tokens, logprobs))
    return results


DELTA_TOL = 1e-5
LOGIT_TOL = 1e-4


def assert_matches_peft(base, original, converted):
    """ΔW per module within DELTA_TOL (relative) and logits within LOGIT_TOL, both through PEFT; and the adapter
    must really change the logits, so that the comparison means something."""
    ref = peft_delta_weights(base, original)
    ours = peft_delta_weights(base, converted)
    assert max_rel_delta_error(ref, ours) <= DELTA_TOL
    ids = prompt_ids(base)
    ref_logits = peft_logits(base, original, ids)
    assert (ref_logits - base_logits(base, ids)).abs().max() > 1e-2, "adapter too weak for a meaningful test"
    assert (ref_logits - peft_logits(base, converted, ids)).abs().max() <= LOGIT_TOL


def adalora_config(arch: str, *, total_step: int, init_r: int = 8, target_r: int = 3, lora_alpha: float = 16, **kw):
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        tinit=5,
        tfinal=5,
        deltaT=2,
        total_step=total_step,
        lora_alpha=lora_alpha,
        target_modules=TARGETS[arch],
        task_type="CAUSAL_LM",
        **kw,
    )


def lora_config(arch: str, **kw):
    from peft import LoraConfig

    defaults = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], "task_type": "CAUSAL_LM"}
    return LoraConfig(**{**defaults, **kw})


EVAL_TEXTS = ["the quick brown fox jumps over the lazy dog", "adapters are served side by side", "pruned values"]


def peft_token_loss(base, adapter, texts) -> float:
    """Σ next-token loss / Σ predicted tokens of the saved adapter in PEFT, one example at a time (no padding)."""
    from transformers import AutoTokenizer

    from adaconvert.training.data import tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = peft_model(base, adapter)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in tokenize(texts, tokenizer, max_length=16).examples:
            ids = torch.tensor([ids])
            # logits, not PEFT's loss: an AdaLoRA model loaded for inference cannot add its training penalty
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            tokens += ids.shape[1] - 1
    return total / tokens
