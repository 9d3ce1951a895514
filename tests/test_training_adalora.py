"""AdaLoRA trained through the HF Trainer: the budget really moves, once per optimizer step, also under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from adaconvert.constants import RANK_HISTORY_NAME
from adaconvert.process import torch_threads
from adaconvert.readers import read_adapter
from adaconvert.training.config import adalora_schedule, load_options
from tests.helpers.peft_utils import peft_model, prompt_ids
from tests.helpers.training_utils import ADALORA, QUICK, quick_train, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("adalora-data") / "data.jsonl")


def test_trainer_adalora_prunes_to_the_budget(trained, tiny_llama):
    result = trained.get("adalora")
    out = Path(result.output)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] is not None
    ranks = {key.removesuffix(".lora_E"): sum(mask) for key, mask in config["rank_pattern"].items()}
    assert len(set(ranks.values())) > 1, "AdaLoRA should give modules different ranks"
    assert sum(ranks.values()) == config["target_r"] * len(ranks)  # the total budget is exactly the target
    assert ranks == result.ranks

    history = json.loads((out / RANK_HISTORY_NAME).read_text())
    assert history["target_budget"] == sum(ranks.values())
    assert history["update_and_allocate_calls"] == history["total_step"] == 30
    steps = [entry["step"] for entry in history["history"]]
    assert steps == sorted(steps) and steps[-1] == history["total_step"] - history["tfinal"]
    assert history["history"][0]["total_rank"] > history["history"][-1]["total_rank"]
    assert history["history"][-1]["ranks"] == ranks
    assert read_adapter(out).provenance["rank_history"] == history  # the converter reads it

    # PEFT reloads the checkpoint and computes what the trained model computed
    ids = prompt_ids(tiny_llama)
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
        reloaded = peft_model(tiny_llama, out)(ids).logits
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_without_the_callback_peft_never_prunes(tiny_llama, data, tmp_path):
    """The bug we prevent: HF Trainer does not call update_and_allocate, so AdaLoRA trains as a fixed-rank LoRA."""
    from adaconvert.training.adalora import adalora_config
    from adaconvert.training.data import load_texts, tokenize
    from adaconvert.training.phase import run_phase
    from adaconvert.training.trainer import _peft, load_base_model, load_tokenizer

    opts = load_options(
        "adalora",
        model=str(tiny_llama),
        data=str(data),
        output=str(tmp_path / "x"),
        **QUICK,
        **ADALORA,
    )
    tokenizer = load_tokenizer(opts.model)
    dataset = tokenize(load_texts(data), tokenizer, max_length=opts.max_length)
    model = _peft(load_base_model(opts.model, "fp32"), adalora_config(opts, adalora_schedule(opts, 30), "all-linear"))
    with torch_threads(1):
        run_phase(model, dataset, tokenizer, opts, precision="fp32", callbacks=[])
    assert model.peft_config["default"].rank_pattern is None
    E = [p for n, p in model.named_parameters() if "lora_E" in n]
    assert all(bool((e != 0).all()) for e in E), "no singular value was pruned"
    model.save_pretrained(str(tmp_path / "saved"))
    saved = read_adapter(tmp_path / "saved")
    assert set(saved.ranks.values()) == {8}  # every module still at init_r


class Spy(TrainerCallback):
    """Counts micro-batch forwards and update_and_allocate calls, and checks that the gradients are still there."""

    def __init__(self):
        self.steps: list[int] = []
        self.forwards = 0
        self.grads_present: list[bool] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.base_model
        real = base.update_and_allocate

        def counting(global_step):
            self.steps.append(global_step)
            grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
            self.grads_present.append(all(g is not None and bool(g.abs().sum() > 0) for g in grads))
            return real(global_step)

        base.update_and_allocate = counting
        model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))


def test_grad_accumulation_calls_update_once_per_optimizer_step(tiny_llama, data, tmp_path):
    spy = Spy()
    result = quick_train(
        "adalora", tiny_llama, data, tmp_path / "out", grad_accum=2, steps=12, tinit=2, tfinal=2, callbacks=[spy]
    )
    assert spy.steps == list(range(12))  # one call per optimizer step, with that step's index
    assert spy.forwards == 24  # two micro-batches per optimizer step
    assert all(spy.grads_present), "update_and_allocate must run before the gradients are cleared"
    assert result.rank_history["update_and_allocate_calls"] == 12


def test_total_step_counts_epochs_and_accumulation(tiny_llama, data, tmp_path):
    # 32 examples, batch 4 -> 8 micro-batches per epoch, accumulation 2 -> 4 optimizer steps, 3 epochs -> 12
    result = quick_train(
        "adalora",
        tiny_llama,
        data,
        tmp_path / "out",
        steps=None,
        epochs=3,
        batch_size=4,
        grad_accum=2,
        tinit=None,
        tfinal=None,
        delta_t=None,
    )
    assert result.main.optimizer_steps == 12
    history = result.rank_history
    assert history["total_step"] == 12 and history["update_and_allocate_calls"] == 12
    assert (history["tinit"], history["tfinal"], history["delta_t"]) == (1, 2, 1)  # 10 % / 20 % / 1 % defaults
    assert sum(result.ranks.values()) == history["target_budget"]


def test_orthogonality_loss_is_added(tiny_llama):
    """PEFT adds orth_reg_weight · R(A, B) only when the model computes the loss (labels given), as our collator
    makes the Trainer do."""
    from peft import get_peft_model

    from adaconvert.training.adalora import adalora_config
    from adaconvert.training.data import CausalCollator
    from tests.helpers.peft_utils import load_base

    opts = load_options("adalora", model="m", data="d", output="o", steps=30)
    batch = CausalCollator(0)([{"input_ids": [4, 5, 6, 7]}, {"input_ids": [5, 6]}])
    assert (batch["labels"][1, 2:] == -100).all()
    losses = []
    for weight in (0.0, 0.5):
        opts.orth_reg_weight = weight
        torch.manual_seed(0)
        model = get_peft_model(load_base(tiny_llama), adalora_config(opts, adalora_schedule(opts, 30), "all-linear"))
        losses.append(float(model(**batch).loss))
    assert losses[1] > losses[0] + 1e-4


class LossLog(TrainerCallback):
    """The losses the Trainer logs, one per logging step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


@pytest.mark.parametrize(("batch_size", "grad_accum"), [(8, 1), (2, 4)])
def test_orthogonality_penalty_counts_once_per_optimizer_step(tiny_llama, tmp_path, batch_size, grad_accum):
    """The Trainer normalises the loss by the tokens of the whole optimizer step and no longer divides by the
    accumulation steps: PEFT's per-micro-batch penalty counted grad_accum times. The first logged loss must be
    PEFT's own loss (cross-entropy + orth_reg_weight · R) of those 8 examples as one batch."""
    from adaconvert.training.adalora import adalora_config
    from adaconvert.training.data import CausalCollator, load_texts, tokenize
    from adaconvert.training.phase import run_phase
    from adaconvert.training.trainer import _peft, load_base_model, load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", repeat=1)  # 8 sentences: one optimizer step sees them all
    settings = {**QUICK, "batch_size": batch_size, "grad_accum": grad_accum, "logging_steps": 1, "lora_dropout": 0}
    opts = load_options("adalora", model=str(tiny_llama), data=str(data), output="o", **settings, steps=1)
    tokenizer = load_tokenizer(opts.model)
    dataset = tokenize(load_texts(data), tokenizer, max_length=opts.max_length)
    assert len(dataset) == 8
    torch.manual_seed(0)
    schedule = adalora_schedule(opts, 10)  # steps=1 has no budget phase; the penalty does not depend on it
    model = _peft(load_base_model(opts.model, "fp32"), adalora_config(opts, schedule, ["q_proj", "v_proj"]))
    batch = CausalCollator(tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    with torch.no_grad():
        expected = float(model(**batch).loss)  # PEFT: mean cross-entropy over the 8 examples' tokens + 0.5 · R
    log = LossLog()
    with torch_threads(1):
        run_phase(model, dataset, tokenizer, opts, precision="fp32", callbacks=[log])
    # float32 sums over the same tokens split into other micro-batches: equal to ~1e-6; the bug was +1.5 · R ≈ 4
    assert log.losses[0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_ranknum_stays_frozen_with_a_bf16_base(tiny_llama, data, tmp_path):
    """PEFT re-creates ranknum as a trainable parameter when it casts a bf16 base; AdamW then moved each module's
    divisor while the saved adapter assumes init_r. The trained model and the saved adapter must agree."""
    from peft import PeftModel, get_peft_model

    from adaconvert.training.adalora import adalora_config
    from tests.helpers.peft_utils import load_base

    targets = ["q_proj", "v_proj"]
    opts = load_options("adalora", model="m", data="d", output="o", **ADALORA)
    fp32 = get_peft_model(load_base(tiny_llama), adalora_config(opts, adalora_schedule(opts, 30), targets))
    expected = sum(p.numel() for p in fp32.parameters() if p.requires_grad)

    result = quick_train("adalora", tiny_llama, data, tmp_path / "out", precision="bf16", target_modules=targets)
    ranknums = [p for n, p in result.model.named_parameters() if ".ranknum." in n]
    assert len(ranknums) == 4 and not any(p.requires_grad for p in ranknums)
    assert all(float(p) == opts.init_r for p in ranknums)
    assert result.main.trainable_params == expected

    # both sides in float32 on the same bf16-loaded base, so that bf16 rounding of activations (1 ulp ≈ 0.03 at
    # these logits) does not hide a drifted divisor; the adapter is loaded onto the float32 copy (PEFT loading it
    # onto a bf16 base would round it to bf16 first). What is left is float32 summation order (the reloaded
    # adapter is sliced to its kept ranks): ~1e-6. A ranknum moved by AdamW (0.26 off init_r 8) was ~0.1 off.
    ids = prompt_ids(tiny_llama)
    reloaded = PeftModel.from_pretrained(load_base(tiny_llama, torch.bfloat16).float(), result.output).eval()
    with torch.no_grad():
        trained = result.model.eval().float()(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, trained, rtol=0, atol=1e-4)


def _train_with_skips(tiny_llama, opts, steps: int, skipped: set[int]):
    """``steps`` optimizer steps (of a schedule over ``opts.steps``) of a real AdaLoRA model through accelerate's
    optimizer and a real GradScaler (CPU), an fp16 overflow (an inf gradient) injected at the steps in ``skipped``,
    the budget driven as the Trainer does.

    Returns:
        (model, AdaLoraCallback, {trainer step: (total kept rank, whether the ranks are final)}).
    """
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from adaconvert.training.adalora import AdaLoraCallback, adalora_config, module_ranks
    from adaconvert.training.trainer import _peft
    from tests.helpers.peft_utils import load_base, training_batch

    torch.manual_seed(0)
    model = _peft(
        load_base(tiny_llama).train(), adalora_config(opts, adalora_schedule(opts, opts.steps), "all-linear")
    )
    budget = AdaLoraCallback(model, opts)
    batch = training_batch(tiny_llama)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    Accelerator(cpu=True)  # the state accelerate's optimizer reads (the Trainer makes one the same way)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = AcceleratedOptimizer(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), scaler=scaler
    )
    first_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    totals = {}
    for step in range(steps):
        scaler.scale(model(**batch, labels=labels).loss).backward()
        if step in skipped:
            first_a.grad[0, 0] = float("inf")  # an fp16 overflow
        optimizer.step()
        assert optimizer.step_was_skipped == (step in skipped)
        budget.on_optimizer_step(None, type("State", (), {"global_step": step})(), None, optimizer=optimizer)
        optimizer.zero_grad()
        pattern = budget.config.rank_pattern
        # the final allocation empties the importance scores; they stay empty while the ranks are fixed
        final = bool(pattern) and not model.base_model.rankallocator.ipt
        totals[step] = (sum(module_ranks(pattern).values()) if pattern else None, final)
    return model, budget, totals


def test_a_step_the_loss_scaler_skips_leaves_the_budget_alone(tiny_llama):
    """fp16: GradScaler skips optimizer.step() on inf/NaN gradients. The budget must not count that step, and the
    importance scores must never read those gradients. A real GradScaler (CPU) behind accelerate's optimizer."""
    opts = load_options("adalora", model="m", data="d", output="o", **ADALORA)
    model, budget, _ = _train_with_skips(tiny_llama, opts, 8, {4})
    allocator = model.base_model.rankallocator
    assert allocator.exp_avg_ipt and all(bool(torch.isfinite(t).all()) for t in allocator.exp_avg_ipt.values())
    assert all(bool(torch.isfinite(t).all()) for t in allocator.exp_avg_unc.values())
    assert budget.calls == 7  # the budget's step index counts real optimizer steps only
    assert budget.history_record()["skipped_steps"] == 1


@pytest.mark.slow
def test_skipped_steps_still_reach_the_budget_tfinal_steps_before_the_end(tiny_llama):
    """More steps skipped (8) than tfinal (5): counted in real steps against the Trainer's 30, the final allocation
    (real step 25) never came and the ranks ended above the budget. Each skip shortens the budgeting phase: the
    budget is reached at Trainer step 30 − tfinal, and the ranks stay fixed for the last tfinal steps."""
    opts = load_options("adalora", model="m", data="d", output="o", **ADALORA)  # 30 steps, tinit 5, tfinal 5
    _, budget, totals = _train_with_skips(tiny_llama, opts, 30, set(range(8, 16)))
    record = budget.history_record()
    assert record["skipped_steps"] == 8 and record["update_and_allocate_calls"] == 22
    assert record["history"][-1]["total_rank"] == record["target_budget"]
    final = 30 - opts.tfinal
    assert not totals[final - 1][1]
    assert {totals[step] for step in range(final, 30)} == {(record["target_budget"], True)}
