"""Log-in throttling per account and per client address.

Each password check costs ~50 ms of scrypt on the cores the pipeline needs, so a
locked account or address is refused before any hashing. The state lives in this
process's memory: the console is one process (a thread of `headscreen serve`, or
`headscreen web`); a restart forgets it, which gives back only a few guesses.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from headscreen.daemon.config import WebConfig

Scope = Literal["account", "address"]
# Keys kept per scope; beyond it the least recently seen is forgotten, so a flood of
# made-up user names cannot grow memory without bound.
MAX_KEYS = 10_000


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    pending: int = 0  # checks in flight: counted so a burst of parallel guesses cannot overshoot
    locked_until: float = 0.0
    strikes: int = 0  # lockouts so far; each doubles the next one
    last_failure: float = 0.0


@dataclass(frozen=True)
class Lockout:
    """A lockout that just started: the one thing audited (not every failure)."""

    scope: Scope
    key: str
    failures: int
    lock_s: int


class Throttled(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s


def _scoped(account: str, address: str) -> tuple[tuple[Scope, str], ...]:
    return (("account", account), ("address", address))


class LoginThrottle:
    def __init__(self, config: WebConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()  # sync routes run in a thread pool
        self._states: dict[Scope, OrderedDict[str, _State]] = {"account": OrderedDict(), "address": OrderedDict()}

    def _limit(self, scope: Scope) -> int:
        return self.config.login_max_failures if scope == "account" else self.config.login_max_failures_per_address

    def _state(self, scope: Scope, key: str, now: float) -> _State:
        table = self._states[scope]
        state = table.get(key)
        if state is None:
            state = table[key] = _State()
            while len(table) > MAX_KEYS:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        horizon = now - self.config.login_window_s
        while state.failures and state.failures[0] <= horizon:
            state.failures.popleft()
        quiet_since = max(state.last_failure, state.locked_until)
        if state.strikes and state.locked_until <= now and now - quiet_since > self.config.login_lockout_max_s:
            state.strikes = 0  # no failure for a longest lockout after the last one: start short again
        return state

    def begin(self, account: str, address: str) -> None:
        """Admit one password check, or raise Throttled with the seconds to wait."""
        with self._lock:
            now = self.clock()
            states = [(scope, self._state(scope, key, now)) for scope, key in
                      _scoped(account, address)]
            wait = max((s.locked_until - now for _, s in states), default=0.0)
            if wait <= 0 and any(len(s.failures) + s.pending >= self._limit(scope) for scope, s in states):
                wait = 1.0  # the limit is taken by checks still running; they end in well under a second
            if wait > 0:
                raise Throttled(max(1, math.ceil(wait)))
            for _, state in states:
                state.pending += 1

    def succeeded(self, account: str, address: str) -> None:
        """The right password: the account starts afresh; the address keeps its failures
        (one good account must not buy guesses at others)."""
        with self._lock:
            self._states["account"].pop(account, None)
            state = self._states["address"].get(address)
            if state is not None:
                state.pending = max(0, state.pending - 1)

    def abandoned(self, account: str, address: str) -> None:
        """The check did not finish (database error): neither a failure nor a success."""
        with self._lock:
            for scope, key in _scoped(account, address):
                state = self._states[scope].get(key)
                if state is not None:
                    state.pending = max(0, state.pending - 1)

    def failed(self, account: str, address: str) -> list[Lockout]:
        """A wrong password (or unknown user): the lockouts this failure started."""
        started = []
        with self._lock:
            now = self.clock()
            for scope, key in _scoped(account, address):
                state = self._state(scope, key, now)
                state.pending = max(0, state.pending - 1)
                state.failures.append(now)
                state.last_failure = now
                if len(state.failures) >= self._limit(scope) and state.locked_until <= now:
                    state.strikes += 1
                    lock_s = min(self.config.login_lockout_s * 2 ** (state.strikes - 1),
                                 self.config.login_lockout_max_s)
                    state.locked_until = now + lock_s
                    started.append(Lockout(scope, key, len(state.failures), math.ceil(lock_s)))
                    state.failures.clear()
        return started
