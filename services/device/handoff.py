"""Catch-up and hand-off bookkeeping: which tokens the device prefills, when it takes
over, and what happens to cloud tokens it does not need (pure, no I/O).

Sequences, all indexed from 1 over the *response* (the prompt P' comes before it):
  r_1..r_R   cloud tokens received, in order (the cloud stream is ordered; a gap or a
             repeat in it is a protocol error, raised, never silently patched)
  c          response tokens in the device's KV cache: it holds P' + r_1..r_c
  d          tokens displayed so far (always a prefix r_1..r_d before the hand-off)

Catch-up: the device prefills P' in chunks, then r_{c+1}..r_R in chunks, while the
display advances. After each chunk it may hand off when ``c >= d``: its cache then
covers every displayed token, and the chunk's last logits predict token c+1.

The rule at hand-off (documented in docs/pd-device.md):
  - r_{d+1}..r_c (received, in the cache, not yet shown) stay in the display buffer
    and are shown: they are exactly what the cache was built from;
  - r_{c+1}.. (received after the chunk started, or still in flight) are dropped and
    the cloud is told to stop. They are never shown, because d <= c at hand-off and
    the display cannot pass c afterwards (the buffer is cut at c atomically);
  - the device's own tokens g_{c+1}, g_{c+2}, ... follow.
So the user sees r_1..r_c g_{c+1}..: nothing repeated, skipped or reordered.
If the cloud ends the answer itself (EOS or the user's max_tokens) before a hand-off,
the answer is r_1..r_R and the device computes nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class StreamError(ValueError):
    """The cloud stream broke the ordering contract."""


@dataclass
class Reconciler:
    prompt_len: int  # |P'|
    chunk: int = 256  # max tokens per catch-up chunk (amortisation granularity)
    received: list[int] = field(default_factory=list)
    cached: int = 0  # tokens of P' + response in the device cache
    handed_off_at: int | None = None  # c at hand-off
    device_tokens: list[int] = field(default_factory=list)
    dropped: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.chunk < 1:
            raise ValueError("prompt_len and chunk must be >= 1")

    @property
    def covered(self) -> int:
        """Response tokens in the device cache (c)."""
        return max(0, self.cached - self.prompt_len)

    def receive(self, index: int, token: int) -> bool:
        """A cloud token with its 1-based response index. False once handed off (drop)."""
        if index != len(self.received) + 1:
            raise StreamError(f"cloud token #{index} after #{len(self.received)}")
        self.received.append(token)
        if self.handed_off_at is not None:
            self.dropped += 1
            return False
        return True

    def next_chunk(self, prompt: list[int]) -> tuple[int, list[int]]:
        """(start, ids): the next tokens of P' + received to prefill (empty: none yet)."""
        if self.handed_off_at is not None:
            return self.cached, []
        seq_len = self.prompt_len + len(self.received)
        end = min(seq_len, self.cached + self.chunk)
        lo, hi = max(0, self.cached - self.prompt_len), max(0, end - self.prompt_len)
        ids = [*prompt[self.cached:min(end, self.prompt_len)], *self.received[lo:hi]]
        return self.cached, ids

    def chunk_done(self, start: int, n: int) -> None:
        if start != self.cached:
            raise StreamError(f"chunk at {start} but the cache holds {self.cached}")
        self.cached += n

    def can_hand_off(self, displayed: int) -> bool:
        """The cache covers every displayed token (and the prompt)."""
        return self.handed_off_at is None and self.cached >= self.prompt_len \
            and self.covered >= displayed

    def hand_off(self, displayed: int) -> tuple[int, int]:
        """Take over. Returns (c, keep): the response index the device continues after,
        and how many tokens still in the display buffer to keep (r_{d+1}..r_c)."""
        if not self.can_hand_off(displayed):
            raise StreamError(f"cannot hand off: cache covers {self.covered} response "
                              f"tokens, {displayed} displayed")
        c = self.covered
        self.handed_off_at = c
        self.dropped += len(self.received) - c
        return c, c - displayed

    def device_token(self, token: int) -> None:
        if self.handed_off_at is None:
            raise StreamError("device token before the hand-off")
        self.device_tokens.append(token)

    def answer(self) -> list[int]:
        """The response as the user sees it, once every kept token is displayed."""
        if self.handed_off_at is None:
            return list(self.received)
        return [*self.received[:self.handed_off_at], *self.device_tokens]
