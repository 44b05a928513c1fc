"""Reconciliation rule: the user's stream is r_1..r_c then the device's tokens."""

from __future__ import annotations

import random

import pytest

from services.device.handoff import Reconciler, StreamError


def run(seed: int) -> tuple[list[int], list[int], Reconciler]:
    """Random interleaving of cloud arrivals, display steps and catch-up chunks."""
    rng = random.Random(seed)
    prompt = list(range(100, 100 + rng.randint(1, 40)))
    cloud = [rng.randrange(1000) for _ in range(60)]
    rec = Reconciler(len(prompt), chunk=rng.randint(1, 16))
    prefilled: list[int] = []
    shown: list[int] = []
    buffer: list[int] = []
    received = 0
    while rec.handed_off_at is None:
        ev = rng.random()
        if ev < 0.4 and received < len(cloud):
            received += 1
            if rec.receive(received, cloud[received - 1]):
                buffer.append(cloud[received - 1])
        elif ev < 0.7 and buffer:
            shown.append(buffer.pop(0))
        else:
            start, ids = rec.next_chunk(prompt)
            if ids:
                assert start == len(prefilled)
                prefilled.extend(ids)
                rec.chunk_done(start, len(ids))
                # The cache holds exactly P' followed by the cloud's tokens, in order.
                assert prefilled == (prompt + cloud)[:len(prefilled)]
            if rec.can_hand_off(len(shown)):
                _, keep = rec.hand_off(len(shown))
                del buffer[keep:]
    while received < len(cloud):  # late cloud tokens are dropped
        received += 1
        assert not rec.receive(received, cloud[received - 1])
    for _ in range(5):
        tok = rng.randrange(1000, 2000)
        rec.device_token(tok)
        buffer.append(tok)
    shown.extend(buffer)
    return shown, cloud, rec


@pytest.mark.parametrize("seed", range(200))
def test_stream_is_coherent(seed: int) -> None:
    shown, cloud, rec = run(seed)
    c = rec.handed_off_at
    assert c is not None
    assert shown == rec.answer()
    assert shown[:c] == cloud[:c]  # a prefix of the cloud's stream, in order
    assert shown[c:] == rec.device_tokens  # then the device's, none repeated or skipped
    assert rec.dropped == len(cloud) - c


def test_chunk_inside_the_prompt_takes_no_cloud_tokens() -> None:
    rec = Reconciler(10, chunk=4)
    for i in range(8):
        rec.receive(i + 1, 100 + i)
    assert rec.next_chunk(list(range(10))) == (0, [0, 1, 2, 3])


def test_chunks_cover_prompt_then_received() -> None:
    rec = Reconciler(3, chunk=2)
    prompt = [7, 8, 9]
    assert rec.next_chunk(prompt) == (0, [7, 8])
    rec.chunk_done(0, 2)
    rec.receive(1, 50)
    assert rec.next_chunk(prompt) == (2, [9, 50])
    rec.chunk_done(2, 2)
    assert rec.covered == 1
    assert not rec.can_hand_off(2)
    assert rec.can_hand_off(1)


def test_out_of_order_cloud_token_is_an_error() -> None:
    rec = Reconciler(1)
    rec.receive(1, 5)
    with pytest.raises(StreamError):
        rec.receive(3, 6)
    with pytest.raises(StreamError):
        rec.receive(1, 5)


def test_no_device_token_before_hand_off() -> None:
    rec = Reconciler(1)
    with pytest.raises(StreamError):
        rec.device_token(1)
    with pytest.raises(StreamError):
        rec.hand_off(0)  # the prompt is not prefilled yet
