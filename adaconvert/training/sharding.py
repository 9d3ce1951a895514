"""What a distributed run needs beyond the Trainer: full tensors from FSDP2 shards, one decision taken on the
main process and obeyed by all, and collectives that leave nothing behind in gloo's worker threads (:func:`released`).

Under FSDP2 every parameter (and its gradient) is a ``DTensor`` holding one shard per process, sharded on dim 0;
outside a layer's forward and backward only the shard is present. AdaLoRA's budget, LoRA-Drop's weight scores
and the saved adapter need whole tensors: :func:`full` gathers one (a collective: every process calls it, in the
same order). Without FSDP, tensors are returned as they are.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pickle
import time

import torch


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 / ``DTensor`` shard."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when ``tensor`` is a ``DTensor`` (differentiable), else
    ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_tensors(tensors: list) -> list[torch.Tensor]:
    """The whole tensors of ``tensors``, gathered together: one all-gather for all the FSDP2 shards among them (per
    dtype), where :func:`full` on each would issue one per tensor. Differentiable like :func:`full`; plain tensors
    are returned as they are.

    Every process must call this with the same tensors in the same order. Shards sharded on dim 0 of a 1-D mesh
    (FSDP2's layout) travel in the one gather; any other layout falls back to :func:`full`.

    Args:
        tensors: plain tensors and ``DTensor`` shards, in any mix.

    Returns:
        Whole tensors, in the order of ``tensors``.
    """
    result = list(tensors)
    groups: dict = {}
    for i, tensor in enumerate(tensors):
        if not is_sharded(tensor):
            continue
        if _row_sharded(tensor):
            groups.setdefault((tensor.dtype, tensor.device_mesh), []).append(i)
        else:
            result[i] = tensor.full_tensor()
    for (_, mesh), indices in groups.items():
        for i, whole in zip(indices, _gather_rows([tensors[i] for i in indices], mesh), strict=True):
            result[i] = whole
    return result


def _row_sharded(tensor) -> bool:
    from torch.distributed.tensor import Shard

    return tensor.device_mesh.ndim == 1 and tuple(tensor.placements) == (Shard(0),)


def _rows(size: int, world: int) -> list[int]:
    """Rows of each process's shard of a dim of ``size`` rows: ``torch.chunk``'s split, as DTensor's ``Shard``."""
    chunk = -(-size // world)
    return [max(0, min(chunk, size - r * chunk)) for r in range(world)]


def _gather_rows(shards: list, mesh) -> list[torch.Tensor]:
    """Whole tensors of row-sharded ``DTensor`` s, in one all-gather of all local shards flattened together."""
    group = mesh.get_group()
    world, me = mesh.size(), mesh.get_local_rank()
    rows = [_rows(s.shape[0], world) for s in shards]
    widths = [s.shape[1:].numel() for s in shards]
    sizes = [sum(r[p] * w for r, w in zip(rows, widths, strict=True)) for p in range(world)]
    flat = torch.cat([s.to_local().reshape(-1) for s in shards])
    if flat.device.type != mesh.device_type:  # shards offloaded to the CPU (fsdp_offload_params) travel on the GPU
        flat = flat.to(mesh.device_type)
    gathered = _AllGatherPadded.apply(flat, group, max(sizes), me)  # (world, max size)
    pieces = []
    for p in range(world):
        parts = gathered[p, : sizes[p]].split([r[p] * w for r, w in zip(rows, widths, strict=True)])
        pieces.append([part.view(r[p], *s.shape[1:]) for part, r, s in zip(parts, rows, shards, strict=True)])
    return [torch.cat([pieces[p][i] for p in range(world)]) for i in range(len(shards))]


class _AllGatherPadded(torch.autograd.Function):
    """All-gather of one flat tensor per process, each padded to ``width``.

    The backward hands each process the gradient of its own piece without communicating: every process computes
    the same function of the gathered tensors (as ``DTensor.full_tensor()``'s backward assumes too), so its own
    gradient is already the gradient of that function.
    """

    @staticmethod
    def forward(ctx, flat, group, width, me):
        import torch.distributed as dist

        ctx.me, ctx.size = me, flat.numel()
        padded = torch.nn.functional.pad(flat, (0, width - flat.numel())).contiguous()
        out = padded.new_empty(dist.get_world_size(group) * width)
        with released(padded, out):
            dist.all_gather_into_tensor(out, padded, group=group)
        return out.view(-1, width)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.me, : ctx.size], None, None, None


def shard_like(whole: torch.Tensor, like) -> torch.Tensor:
    """This process's shard of ``whole`` (the same on every process) in the layout of the ``DTensor`` ``like``,
    cut locally (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors (keys with ``lora_``) of ``model.state_dict()``, whole, on the CPU.

    Under FSDP2 they are gathered from the shards in one collective (every process must call this); the base
    model's weights are not gathered. A tensor shared by several modules (LoRA-Drop ``share``) keeps one entry per
    module, as a LoRA checkpoint needs.
    """
    state = {key: value.detach() for key, value in model.state_dict().items() if "lora_" in key}
    return {key: whole.cpu() for key, whole in zip(state, full_tensors(list(state.values())), strict=True)}


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
    with released(flat):
        dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(mean.view_as(grad))


@contextlib.contextmanager
def released(*tensors: torch.Tensor):
    """Around one blocking collective on CPU ``tensors``: leave only once the process group has let go of them.

    Gloo runs a collective on a worker thread, which drops its references to the tensors a moment *after* the
    collective completes and the caller has moved on. When the caller has dropped its own by then, the worker's
    drop is the last: it frees the tensors' Python objects, so it takes the GIL. After the run's last collective the
    caller may already be exiting, and a thread that takes the GIL once the interpreter is finalising is ended with
    ``pthread_exit``, which aborts a C++ thread ("terminate called without an active exception", SIGABRT): a run
    that succeeded, reported as failed by its launcher (seen on 1 in 4 test-suite runs with FSDP on 2 CPU
    processes; the core dump shows gloo's worker in ``~AsyncAllgatherWork`` → ``decref_pyobject`` → ``take_gil``
    → ``PyThread_exit_thread``). Waiting here until the tensors' use counts are back to what they were keeps the
    caller's reference the last.

    CUDA tensors are not waited for: NCCL's watchdog thread releases its work later, on its own schedule, and
    ``destroy_process_group`` ends it (:func:`_destroy_process_group_at_exit`).
    """
    # Tensor._use_count is torch's own (private) count; tests/test_sharding.py fails should a torch drop it
    if not all(t.device.type == "cpu" for t in tensors) or not hasattr(torch.Tensor, "_use_count"):
        yield
        return
    counts = [t._use_count() for t in tensors]  # the TensorImpl's C++ references, Python's included
    yield
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    while any(t._use_count() > n for t, n in zip(tensors, counts, strict=True)):
        if time.monotonic() > deadline:  # someone else holds one now: nothing left to wait for
            return
        time.sleep(_RELEASE_POLL_S)  # lets the worker run (and take the GIL, if it needs it)


_RELEASE_TIMEOUT_S = 5.0
_RELEASE_POLL_S = 1e-4


def broadcast_object(obj, *, src: int = 0):
    """``obj`` of process ``src`` on every process (pickled; every process must call this).

    ``torch.distributed.broadcast_object_list`` would do, but its tensors are its own and cannot be waited for
    (:func:`released`), and a broadcast is often the last collective before a process exits (a refusal that every
    process raises).
    """
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = pickle.dumps(obj) if dist.get_rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    with released(size):
        dist.broadcast(size, src=src)
    payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    with released(payload):
        dist.broadcast(payload, src=src)
    # the bytes come from process src of this run (as broadcast_object_list's do), never from a file
    return obj if dist.get_rank() == src else pickle.loads(payload.cpu().numpy().tobytes())


@functools.cache  # once per process
def _destroy_process_group_at_exit() -> None:
    """End the process group while the interpreter is still whole: when nothing else holds the group, this frees
    it, and gloo's destructor joins its worker threads while the interpreter can still give them the GIL (see
    :func:`released` for what a worker left to finalisation does). A no-op when the group is already gone (the
    caller's own ``destroy_process_group``)."""
    import torch.distributed as dist

    def destroy() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(destroy)


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
    _destroy_process_group_at_exit()
    failure = None
    if dist.get_rank() == 0:
        try:
            check()
        except errors.AdaconvertError as exc:
            failure = exc
    failure = broadcast_object(failure, src=0)
    if failure is not None:
        raise failure
