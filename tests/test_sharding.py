"""``sharding.released``: a collective of ours returns only once whoever else held its tensors let go.

Gloo's worker thread drops its references to a collective's tensors a moment after the collective completes; if
that drop is the last one while the interpreter is finalising, the process aborts after a run that succeeded
(the docstring of ``released`` has the core dump's stack). Here a plain thread holds a view of the tensor (a view
keeps its base's C++ use count up, as gloo's work does) and drops it later.
"""

from __future__ import annotations

import threading
import time

import torch

from adaconvert.training import sharding


def _hold(view: torch.Tensor, seconds: float) -> None:
    time.sleep(seconds)


def test_released_waits_for_the_other_holder_to_let_go():
    tensor = torch.zeros(8)
    with sharding.released(tensor):
        holder = threading.Thread(target=_hold, args=(tensor.view(-1), 0.2))
        holder.start()
        started = time.monotonic()
    waited = time.monotonic() - started
    assert tensor._use_count() == 1, "released returned while the thread still held the tensor"
    assert waited >= 0.2
    holder.join()


def test_released_returns_at_once_when_nobody_else_holds_the_tensor():
    tensor = torch.zeros(8)
    started = time.monotonic()
    with sharding.released(tensor):
        tensor.add_(1)
    assert time.monotonic() - started < 0.1


def test_released_gives_up_on_a_holder_that_never_lets_go(monkeypatch):
    monkeypatch.setattr(sharding, "_RELEASE_TIMEOUT_S", 0.1)
    tensor = torch.zeros(8)
    with sharding.released(tensor):
        kept = tensor.view(-1)  # held past the block: not the collective's, nothing to wait for
    assert kept._base is tensor
