"""What a distributed run needs beyond the Trainer: full tensors from FSDP2 shards, and one decision taken on the
main process and obeyed by all.

Under FSDP2 every parameter (and its gradient) is a ``DTensor`` holding one shard per process, sharded on dim 0;
outside a layer's forward and backward only the shard is present. AdaLoRA's budget, LoRA-Drop's weight scores
and the saved adapter need whole tensors: :func:`full` gathers one (a collective: every process calls it, in the
same order). Without FSDP, tensors are returned as they are.
"""

from __future__ import annotations

import os

import torch


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 / ``DTensor`` shard."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when ``tensor`` is a ``DTensor`` (differentiable), else
    ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(whole: torch.Tensor, like) -> torch.Tensor:
    """This process's shard of ``whole`` (the same on every process) in the layout of the ``DTensor`` ``like``,
    cut locally (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors (keys with ``lora_``) of ``model.state_dict()``, whole, on the CPU.

    Under FSDP2 each is gathered from the shards (every process must call this); the base model's weights are
    not gathered. A tensor shared by several modules (LoRA-Drop ``share``) keeps one entry per module, as a LoRA
    checkpoint needs.
    """
    return {key: full(value).detach().cpu() for key, value in model.state_dict().items() if "lora_" in key}


def base_on_main_only() -> bool:
    """Whether transformers' ``from_pretrained`` loads the real weights on the main process only: under
    ``accelerate launch --use_fsdp`` (its ``fsdp_cpu_ram_efficient_loading`` defaults to true) every other process
    gets zeros and FSDP must broadcast the main process's weights when it shards the model. transformers decides
    from the environment, which only the Trainer's own arguments change afterwards (to the value returned here, as
    a phase passes it on), so the answer holds for every load of a run.
    """
    from transformers.integrations import is_fsdp_enabled

    return is_fsdp_enabled()


def shared_modules(model) -> list[torch.nn.Module]:
    """Modules with trainable parameters of their own that ``model`` holds under more than one name: LoRA-Drop's
    shared LoRA (:func:`~adaconvert.training.lora_drop.tie_shared`), one ``lora_A`` / ``lora_B`` per module kind."""
    names: dict[torch.nn.Module, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            names[module] = names.get(module, 0) + 1
    return [module for module, count in names.items() if count > 1]


def average_gradients(params) -> None:
    """Replace the gradient of each of ``params`` (plain tensors, replicated) by its mean over the processes, in
    float32 and in one all-reduce: what DDP does, and FSDP for the parameters it shards."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(mean.view_as(grad))


def world_size() -> int:
    """Processes of a ``torchrun`` / ``accelerate launch`` run (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank in a ``torchrun`` / ``accelerate launch`` run (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def on_main_then_all(check, *, cuda: bool) -> None:
    """Run ``check()`` on the main process; if it raises an ``AdaconvertError``, every process raises the same.

    A check that only the main process makes would leave the others waiting in the Trainer's first collective
    until the timeout (30 minutes by default). The process group is started the way accelerate starts it (gloo
    on CPU), and the Trainer then finds it started.
    """
    if world_size() == 1:
        check()
        return
    import torch.distributed as dist
    from accelerate import PartialState

    from adaconvert import errors

    PartialState(cpu=not cuda, backend=None if cuda else "gloo")
    failure: list = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except errors.AdaconvertError as exc:
            failure[0] = exc
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]
