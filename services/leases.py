"""Sessions as leases: a bounded table of open sessions, reclaimed when their client stops calling.

    table = Leases(max_sessions=64, idle_s=600.0, close=close_fn)   # close_fn(session) -> the CloseSession answer
    with table.reserve():                 # a slot counted under the lock (RESOURCE_EXHAUSTED when full)
        table.add(build_session())
    with table.use(session_id) as s:      # NOT_FOUND names why (closed, expired, unknown); never reaped while in use
        s.step(...)
    table.close(session_id)               # idempotent: a repeat gets the first answer
    table.start_reaper(); table.stop()    # the reaper closes sessions idle for longer than idle_s (and calls on_reap)

A session nobody has called since it was created (its creator may never have seen the answer) is
closed after ``min(idle_s, CLAIM_S)``. The answers of closed sessions are kept for the last ``kept`` only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from services.session import ServiceError

CLAIM_S = 30.0      # the lease of a session not yet called after its creation


@dataclass
class _Lease:
    session: object
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    claimed: bool = False


class Leases:
    """Open sessions with their last use, a bounded cache of closed ones, and the counters of both."""

    def __init__(self, max_sessions: int, idle_s: float, close: Callable[[object], object], kept: int = 1024,
                 on_reap: Callable[[], object] | None = None):
        self.max_sessions, self.idle_s, self.kept = int(max_sessions), float(idle_s), int(kept)
        self._close, self._on_reap = close, on_reap      # on_reap: more to reclaim on each reaper round (streams)
        self._open: dict[str, _Lease] = {}
        self._closed: OrderedDict[str, tuple[str, object]] = OrderedDict()   # id -> (why, answer)
        self._pending = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.counts = {"created": 0, "closed": 0, "expired": 0, "rolled_back": 0, "refused_full": 0}

    # -- admission -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reserve(self) -> Iterator[None]:
        """Hold one of ``max_sessions`` slots while a session is built; full means RESOURCE_EXHAUSTED."""
        self.reap()
        with self._lock:
            if len(self._open) + self._pending >= self.max_sessions:
                self.counts["refused_full"] += 1
                raise ServiceError("RESOURCE_EXHAUSTED", f"the server holds its maximum of {self.max_sessions} "
                                   f"sessions; close one first (idle sessions expire after {self.idle_s:g} s, "
                                   f"ones never called after {min(self.idle_s, CLAIM_S):g} s)")
            self._pending += 1
        try:
            yield
        finally:
            with self._lock:
                self._pending -= 1

    def add(self, session) -> None:
        with self._lock:
            self._open[session.id] = _Lease(session)
            self.counts["created"] += 1

    def rolled_back(self) -> None:
        with self._lock:
            self.counts["rolled_back"] += 1

    # -- use -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, session_id: str) -> Iterator[object]:
        """The open session ``session_id``, marked in use (and its lease renewed) for the block."""
        with self._lock:
            lease = self._open.get(session_id)
            if lease is None:
                raise self._not_found(session_id)
            lease.busy += 1
            lease.claimed = True
            lease.last_used = time.monotonic()
        try:
            yield lease.session
        finally:
            with self._lock:
                lease.busy -= 1
                lease.last_used = time.monotonic()

    def _not_found(self, session_id: str) -> ServiceError:
        why = self._closed.get(session_id, ("", None))[0]
        if why == "expired":
            return ServiceError("NOT_FOUND", f"session {session_id!r} expired: no call for {self.idle_s:g} s "
                                "(the server's session_idle_s); create a new one")
        if why == "unclaimed":
            return ServiceError("NOT_FOUND", f"session {session_id!r} expired: it had no call within "
                                f"{min(self.idle_s, CLAIM_S):g} s of its creation (a new session's first call must "
                                "come within min(session_idle_s, 30 s)); create a new one and reset it at once")
        if why:
            return ServiceError("NOT_FOUND", f"session {session_id!r} is closed; create a new one")
        return ServiceError("NOT_FOUND", f"unknown session {session_id!r}; create one with CreateSession")

    def sessions(self) -> list:
        with self._lock:
            return [lease.session for lease in self._open.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    # -- closing -------------------------------------------------------------------------------
    def close(self, session_id: str):
        """Close a session (once; a repeat gets the same answer): the ``close`` callback's answer."""
        with self._lock:
            if session_id in self._closed:
                return self._closed[session_id][1]
            lease = self._open.pop(session_id, None)
            if lease is None:
                raise self._not_found(session_id)
        return self._finish(lease.session, "closed")

    def _finish(self, session, why: str):
        answer = self._close(session)
        with self._lock:
            self._closed[session.id] = (why, answer)
            while len(self._closed) > self.kept:
                self._closed.popitem(last=False)
            self.counts["expired" if why in ("expired", "unclaimed") else "closed"] += 1
        return answer

    def reap(self) -> int:
        """Close every session idle for longer than its lease and not in a call; returns how many."""
        now = time.monotonic()
        with self._lock:
            unclaimed = min(self.idle_s, CLAIM_S)
            stale = [sid for sid, lease in self._open.items() if not lease.busy and
                     now - lease.last_used > (self.idle_s if lease.claimed else unclaimed)]
            leases = [self._open.pop(sid) for sid in stale]
        for lease in leases:
            self._finish(lease.session, "expired" if lease.claimed else "unclaimed")
        return len(leases)

    def close_all(self) -> list:
        """Stop the reaper and close every open session (shutdown); returns their answers."""
        self.stop()
        with self._lock:
            leases, self._open = list(self._open.values()), {}
        return [self._finish(lease.session, "closed") for lease in leases]

    # -- the reaper ----------------------------------------------------------------------------
    def start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._run, name="session-reaper", daemon=True)
            self._reaper.start()

    def _run(self) -> None:
        interval = min(max(self.idle_s / 4, 0.05), 5.0)
        while not self._stop.wait(interval):
            try:
                self.reap()
                if self._on_reap is not None:
                    self._on_reap()
            except Exception:  # noqa: BLE001 - a failed close is the session's recorder error, kept in its answer
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(10)
