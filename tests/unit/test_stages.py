"""The stage chain: order kept, back-pressure bounded, stop and failure end every stage."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from reembed.signals import StopSignal
from reembed.stages import Chain, Channel, Step


def test_items_come_out_in_order_through_threaded_stages() -> None:
    out: list[int] = []
    ended = threading.Event()
    chain = Chain(StopSignal(), depth=2)
    steps = [Step("double", lambda x: 2 * x), Step("device", lambda x: x + 1, on_caller=True), Step("sink", out.append)]
    chain.run(iter(range(200)), steps, on_end=ended.set, on_abort=lambda: None)
    assert out == [2 * i + 1 for i in range(200)] and ended.is_set() and not chain.errors


def test_a_bounded_channel_holds_the_producer_back() -> None:
    channel = Channel(2)
    assert channel.put(1) and channel.put(2)
    third = threading.Thread(target=channel.put, args=(3,))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # waiting for room
    assert next(iter(channel)) == 1
    third.join(5)
    assert not third.is_alive()


def test_a_stop_request_ends_every_stage_without_the_end_step() -> None:
    stop = StopSignal()
    seen: list[int] = []
    ended = threading.Event()

    def source() -> Iterator[int]:
        i = 0
        while True:  # endless: only the stop ends it
            yield i
            i += 1

    def sink(x: int) -> None:
        seen.append(x)
        if x == 10:
            stop.request("SIGINT")

    started = time.monotonic()
    Chain(stop).run(source(), [Step("device", lambda x: x, on_caller=True), Step("sink", sink)],
                    on_end=ended.set, on_abort=lambda: None)
    assert seen[:11] == list(range(11)) and seen[-1] < 20
    assert not ended.is_set() and time.monotonic() - started < 10


def test_a_failing_stage_cancels_the_others_and_its_error_is_kept() -> None:
    def boom(x: int) -> int:
        if x == 5:
            raise ValueError("model says no")
        return x

    chain = Chain(StopSignal())
    chain.run(iter(range(1000)), [Step("device", boom, on_caller=True), Step("sink", lambda x: None)],
              on_end=lambda: pytest.fail("the end step ran after a failure"), on_abort=lambda: None)
    assert [str(e) for e in chain.errors] == ["model says no"]


def test_a_lookahead_step_sees_the_next_item_only_if_it_is_queued_and_never_takes_it() -> None:
    seen: list[tuple[int, int | None]] = []
    out: list[int] = []

    def device(item: int, peek: Any) -> int:
        seen.append((item, peek()))
        return item

    Chain(StopSignal(), depth=3).run(iter(range(50)), [Step("device", device, on_caller=True, lookahead=True),
                                                       Step("sink", out.append)], on_end=lambda: None,
                                     on_abort=lambda: None)
    assert out == list(range(50))  # nothing taken by a peek, nothing lost
    assert all(nxt is None or nxt == item + 1 for item, nxt in seen)
    assert seen[-1] == (49, None)
