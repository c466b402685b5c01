"""Search terms kept on the server, out of every URL.

A patient ID or accession number typed into the console's search box is posted, kept here
under a random handle, and the list pages, their pagination and sort links and the CSV
export carry only the handle (`find=`). So browser history, a reverse proxy's access log
and Referer headers never see the term. Handles live in the console's memory: they expire
after TTL_S, the oldest go first past CAPACITY, and a restart forgets them all (the page
then asks for the search again).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict

TTL_S = 12 * 3600.0
CAPACITY = 10_000
HANDLE = re.compile(r"^[A-Za-z0-9_-]{22}$")  # token_urlsafe(16)


class SearchHandles:
    def __init__(self, ttl_s: float = TTL_S, capacity: int = CAPACITY) -> None:
        self._ttl_s = ttl_s
        self._capacity = capacity
        self._terms: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, term: str) -> str:
        """A new handle for `term`."""
        handle = secrets.token_urlsafe(16)
        now = time.monotonic()
        with self._lock:
            self._forget_expired(now)
            while len(self._terms) >= self._capacity:
                self._terms.popitem(last=False)
            self._terms[handle] = (term, now + self._ttl_s)
        return handle

    def get(self, handle: str) -> str | None:
        """The term behind `handle`; None when unknown or expired."""
        with self._lock:
            found = self._terms.get(handle)
            if found is None or found[1] <= time.monotonic():
                return None
            return found[0]

    def _forget_expired(self, now: float) -> None:
        # Insertion order is expiry order (one TTL for all).
        while self._terms and next(iter(self._terms.values()))[1] <= now:
            self._terms.popitem(last=False)
