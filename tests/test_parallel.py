"""io.parallel.imap_unordered: every item once, worker state per thread, failures stop every thread."""

from __future__ import annotations

import threading
import time

import pytest

from adaconvert.io.parallel import imap_unordered


def _live_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("adaconvert-worker")]


def test_every_item_once_each_worker_with_its_own_state():
    made = []

    def make_worker():
        state = {"thread": None}
        made.append(state)

        def work(x):
            state["thread"] = threading.current_thread().name
            time.sleep(0.001 * (x % 3))  # finish out of order
            return x * x

        return work

    got = dict(imap_unordered(make_worker, range(200), threads=3, depth=2))
    assert got == {x: x * x for x in range(200)}
    assert len(made) == 3 and len({s["thread"] for s in made}) == 3
    assert not _live_workers()


def test_a_failing_item_stops_every_worker_and_reaches_the_consumer():
    started = []

    def make_worker():
        def work(x):
            started.append(x)
            if x == 5:
                raise ValueError("item 5 is bad")
            time.sleep(0.002)
            return x

        return work

    with pytest.raises(ValueError, match="item 5 is bad"):
        list(imap_unordered(make_worker, range(10_000), threads=2, depth=2))
    assert not _live_workers() and len(started) < 100  # stopped soon, not after the whole list


def test_a_consumer_that_stops_early_joins_the_workers():
    results = imap_unordered(lambda: lambda x: x, range(10_000), threads=2, depth=1)
    assert next(results)[0] in range(10_000)
    results.close()  # the generator's finally stops and joins the workers
    assert not _live_workers()
