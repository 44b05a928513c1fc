"""The speed controller: when each received token is displayed (pure, no I/O).

Tokens (from the cloud, later from the device itself) arrive at times ``a_j`` and go
into a buffer. The controller decides their display times ``D_j``:

  D_1 = a_1, or min(a_2, a_1 + hold)         (shown at once, or held: see below)
  D_j = max(a_j, D_{j-1} + tau_j)            (j >= 2)

``tau_j``, the pace, adapts so that the displayed gap stays smooth and bounded:

  g      = mean inter-arrival gap over the last ``window`` arrivals (the supply rate);
           before two arrivals it is the planned pace ``tau_ms`` (from the optimiser)
  base   = max(tau_ms, g)                    never show faster than tokens come in on
                                             average, or the buffer drains and stalls
  B      = tokens buffered (received, not yet shown) at the moment of release
  tau*   = base * (1 + gain * (target - B) / target)   slower when the buffer is low
                                                        (the cloud/network runs late),
                                                        faster when a burst filled it,
           but never below tau_ms: the plan's display times are what the device's
           catch-up was sized against, so the display must not run ahead of them
  tau_j  = clamp(tau*, tau_{j-1} - step, tau_{j-1} + step) then clamp(tau_min, tau_max)

The step limit keeps consecutive gaps within ``step_ms`` of each other (smooth), the
clamp bounds them (``tau_max``). A gap larger than ``tau_max`` only happens when the
buffer is empty and the next token is simply not there yet: a stall the controller
cannot hide, which the optimiser's no-stall constraints are there to prevent.

``first_hold_ms`` (the hold) exists for the one gap the pace cannot hide: the cloud's
t1 -> t2 gap (its prefill -> decode KV handoff, 100-300 ms for a 4k prompt on a busy
host). With a hold, t1 is shown when t2 has arrived (then D_2 = a_2 + tau: the first
gap is the pace), or when the hold runs out, or when the stream has ended (``end``).
Holding by a fixed estimate of the gap was tried first: the gap varies so much under
load (it doubled between two bench runs) that 1.5x the estimate still left 58 ms gaps;
waiting for t2 itself is exact and costs TTFT only the gap actually seen. The planner
decides when a hold is needed and its cap (optimizer.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ControllerConfig:
    tau_ms: float = 30.0  # planned pace (the optimiser's tau)
    tau_min_ms: float = 10.0  # fastest display pace allowed (a burst is spread out)
    tau_max_ms: float = 50.0  # slowest pace the controller itself chooses
    buffer_target: int = 4  # tokens the controller tries to keep in hand
    gain: float = 0.5  # how hard the buffer level bends the pace
    step_ms: float = 5.0  # max change of the pace between consecutive tokens
    window: int = 16  # arrivals the supply-rate estimate looks back over
    first_hold_ms: float = 0.0  # the first token is shown this long after it arrives

    def __post_init__(self) -> None:
        if not 0 < self.tau_min_ms <= self.tau_ms <= self.tau_max_ms < math.inf:
            raise ValueError("need 0 < tau_min_ms <= tau_ms <= tau_max_ms, got "
                             f"{self.tau_min_ms}, {self.tau_ms}, {self.tau_max_ms}")
        if self.buffer_target < 1 or self.window < 2 or self.gain < 0 or self.step_ms <= 0 \
                or self.first_hold_ms < 0:
            raise ValueError("need buffer_target >= 1, window >= 2, gain >= 0, step_ms > 0, "
                             "first_hold_ms >= 0")


@dataclass
class SpeedController:
    """Buffer + pacing state for one response. Times are in ms on any one clock."""

    cfg: ControllerConfig = field(default_factory=ControllerConfig)
    _buffer: deque[tuple[int, float]] = field(default_factory=deque)  # (token, arrival)
    _arrivals: deque[float] = field(default_factory=deque)
    _last_display: float | None = None
    _tau: float = 0.0
    _ended: bool = False
    displayed: int = 0

    def __post_init__(self) -> None:
        self._tau = self.cfg.tau_ms
        self._arrivals = deque(maxlen=self.cfg.window)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def pace_ms(self) -> float:
        return self._tau

    def push(self, token: int, now: float) -> None:
        self._buffer.append((token, now))
        self._arrivals.append(now)

    def end(self) -> None:
        """No more tokens will come: a held first token need not wait for a second."""
        self._ended = True

    def retarget(self, tau_ms: float, gain: float | None = None) -> None:
        """New planned pace (and optionally buffer gain), e.g. at hand-off: the device's
        own supply. The pace still moves by at most ``step_ms`` per token (smooth)."""
        c = self.cfg
        tau = min(max(tau_ms, c.tau_min_ms), c.tau_max_ms)
        self.cfg = dataclasses.replace(c, tau_ms=tau, gain=c.gain if gain is None else gain)
        self._arrivals.clear()  # the old source's arrival rate says nothing about the new one

    def drop_buffered(self, keep: int) -> list[int]:
        """Keep only the first ``keep`` buffered tokens; return the dropped ones (hand-off)."""
        dropped = [t for t, _ in list(self._buffer)[keep:]]
        while len(self._buffer) > keep:
            self._buffer.pop()
        return dropped

    def _supply_gap(self) -> float:
        if len(self._arrivals) < 2:
            return self.cfg.tau_ms
        return (self._arrivals[-1] - self._arrivals[0]) / (len(self._arrivals) - 1)

    def _next_pace(self) -> float:
        c = self.cfg
        base = max(c.tau_ms, self._supply_gap())
        # The token about to be released still counts as in hand.
        level = len(self._buffer) - 1
        want = base * (1.0 + c.gain * (c.buffer_target - level) / c.buffer_target)
        # Never faster than the planned pace: the plan's display times D_j are what the
        # device's catch-up was sized against; running ahead would outrun it.
        want = max(want, c.tau_ms)
        want = min(max(want, self._tau - c.step_ms), self._tau + c.step_ms)
        return min(max(want, c.tau_min_ms), c.tau_max_ms)

    def next_release(self) -> float | None:
        """When the head of the buffer is due (None: the buffer is empty)."""
        if not self._buffer:
            return None
        _, arrived = self._buffer[0]
        if self._last_display is None:
            hold = self.cfg.first_hold_ms
            if hold <= 0 or self._ended:
                return arrived
            if len(self._buffer) >= 2:  # t2 is in hand: show t1 now, t2 one pace later
                return min(arrived + hold, self._buffer[1][1])
            return arrived + hold
        return max(arrived, self._last_display + self._next_pace())

    def pop_due(self, now: float) -> list[tuple[int, float]]:
        """Release every token due at ``now``: [(token, display_time)]."""
        out: list[tuple[int, float]] = []
        while True:
            due = self.next_release()
            if due is None or due > now:
                return out
            if self._last_display is not None:
                self._tau = self._next_pace()
            token, _ = self._buffer.popleft()
            self._last_display = due
            self.displayed += 1
            out.append((token, due))


def simulate(arrivals: Sequence[float], cfg: ControllerConfig) -> list[float]:
    """Display times for tokens arriving at ``arrivals`` (sorted, ms): the controller
    driven exactly as the device drives it (events at arrivals and release times)."""
    ctl = SpeedController(cfg)
    shown: list[float] = []
    i = 0
    while len(shown) < len(arrivals):
        due = ctl.next_release()
        nxt = arrivals[i] if i < len(arrivals) else math.inf
        if due is not None and due <= nxt:
            shown.extend(t for _, t in ctl.pop_due(due))
        else:
            ctl.push(i, nxt)
            i += 1
            if i == len(arrivals):
                ctl.end()
    return shown


def gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]
