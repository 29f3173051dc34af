"""The request log's write path: `LogWriter`, a bounded queue drained by one thread into a Store.

The gateway hands it completion rows; a daemon thread writes them in batches,
so logging never sits on the HTTP response path.

Invariants (with serve/store/db.py's):
- a row acknowledged by ``flush()`` returning True is committed;
- a process crash loses only rows held here in memory: queued (at most
  ``maxsize``), in the batch being written, waiting in ``asubmit`` for queue
  space, or in ``failed_rows``. Call ``close()`` on shutdown;
- rows are never dropped silently: a write that keeps failing leaves its rows in
  ``failed_rows`` (dead letters), retried on every flush, on close, at once after a
  write succeeds again, and on a timer while idle (``retry_interval``, doubling to
  ``max_retry_interval`` while the store stays down), so an outage of the database
  is written up by itself when it ends;
- the dead letters are bounded (``max_failed``, by default the queue's size): beyond
  it the oldest are dropped, counted in ``dropped`` (``agentloop_log_dropped_rows`` in
  /metrics) and logged. Memory stays bounded through an outage of any length.

Never imports fastapi, torch or vllm.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from sqlalchemy import exc as sa_exc

from agentloop.serve.store.db import Store, check_row

logger = logging.getLogger("agentloop.store")

# ---------------------------------------------------------------- log writer

class _Flush:
    """A marker put in the queue by flush(): every row ahead of it is older."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False


_WAKE = object()  # put by close() so the worker notices promptly


def _is_data_error(exc: BaseException) -> bool:
    """True if retrying the same rows cannot help (bad data, not a busy/down DB)."""
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError, ValueError, TypeError)):
        return True
    # StatementError that is not a DBAPIError: a bind parameter failed to convert.
    return isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)


class LogWriter:
    """Bounded background writer of completions rows into a Store.

    One daemon thread is the only writer: it takes rows from a bounded queue and
    inserts up to ``batch_size`` of them at a time, waiting at most
    ``flush_interval`` seconds after the first row of a batch for more.
    Counters: ``written`` rows committed (an id that already existed counts as
    written), ``failures`` failed insert attempts, ``rejected`` submit() calls
    refused, ``throttled`` asubmit() calls that had to wait for queue space,
    ``pending`` rows accepted but not yet committed (queued, in flight, or in
    ``failed_rows``), ``dropped`` dead letters given up beyond ``max_failed``. The
    caller owns the store and closes it after close().
    """

    def __init__(self, store: Store, *, maxsize: int = 10_000, batch_size: int = 256,
                 flush_interval: float = 0.5, max_retries: int = 3, retry_backoff: float = 0.1,
                 max_failed: int | None = None, retry_interval: float = 1.0, max_retry_interval: float = 30.0):
        if maxsize < 1 or batch_size < 1 or flush_interval <= 0 or max_retries < 0:
            # maxsize 0 would make queue.Queue unbounded: the bound is the point.
            raise ValueError("need maxsize >= 1, batch_size >= 1, flush_interval > 0, max_retries >= 0")
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_failed = max_failed if max_failed is not None else maxsize
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self._retry_wait = retry_interval
        self._next_retry = 0.0
        self._q: queue.Queue = queue.Queue(maxsize)
        self._lock = threading.Lock()  # guards counters, _closed and _blocked_puts
        self._closed = False
        self._blocked_puts = 0  # asubmit rows waiting in a thread for queue space
        self._accepted = 0
        self.written = 0
        self.failures = 0
        self.rejected = 0
        self.throttled = 0
        self.dropped = 0
        self._failed: list[dict[str, Any]] = []  # dead letters; only the worker touches it while alive
        self._thread = threading.Thread(target=self._run, name="agentloop-logwriter", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producers

    def submit(self, row: dict[str, Any]) -> bool:
        """Queue ``row`` without blocking; False if the queue is full or closed.

        The row is copied shallowly: do not mutate nested values afterwards.
        Raises ValueError for a malformed row.
        """
        row = dict(row)
        check_row(row)
        with self._lock:
            if not self._closed:
                try:
                    self._q.put_nowait(row)
                except queue.Full:
                    pass
                else:
                    self._accepted += 1
                    return True
            self.rejected += 1
            return False

    async def asubmit(self, row: dict[str, Any]) -> None:
        """Queue ``row`` from asyncio, waiting (off the event loop) while full.

        Never drops the row; raises RuntimeError if the writer is closed.
        """
        row = dict(row)
        check_row(row)
        with self._lock:
            if self._closed:
                raise RuntimeError("LogWriter is closed")
            self._accepted += 1
            try:
                self._q.put_nowait(row)
                return
            except queue.Full:
                # Counted under the same lock that close() takes, so the worker
                # cannot stop while this row is still on its way in.
                self._blocked_puts += 1
                self.throttled += 1
        # to_thread cannot be cancelled: if our task is, the put still happens.
        await asyncio.to_thread(self._blocking_put, row)

    def _blocking_put(self, row: dict[str, Any]) -> None:
        try:
            self._q.put(row)
        finally:
            with self._lock:
                self._blocked_puts -= 1

    # ------------------------------------------------------------ control

    @property
    def pending(self) -> int:
        with self._lock:
            return self._accepted - self.written - self.dropped

    @property
    def dead_letters(self) -> int:
        """How many rows wait in failed_rows (for /metrics: no copy)."""
        return len(self._failed)

    @property
    def failed_rows(self) -> list[dict[str, Any]]:
        """A snapshot of the dead-letter rows awaiting retry."""
        return list(self._failed)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row submitted before this call is committed.

        False on timeout or if some rows are still in ``failed_rows`` after a
        retry. Call it from a thread, not the event loop: it blocks.
        """
        if not self._thread.is_alive():
            return self.pending == 0
        deadline = time.monotonic() + timeout
        marker = _Flush()
        try:
            self._q.put(marker, timeout=max(timeout, 0.0))
        except queue.Full:
            return False
        if not marker.event.wait(max(deadline - time.monotonic(), 0.0)):
            return False
        return marker.ok

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting rows, write everything queued, stop the thread. Idempotent."""
        with self._lock:
            first = not self._closed
            self._closed = True
        if first:
            try:
                self._q.put_nowait(_WAKE)
            except queue.Full:
                pass  # a full queue keeps the worker busy anyway
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("LogWriter did not drain within %.1fs; %d rows pending", timeout, self.pending)
        elif self._failed:
            logger.error("LogWriter closed with %d rows it could not write (see failed_rows)", len(self._failed))

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            batch: list[dict[str, Any]] = []
            marker: _Flush | None = None
            try:
                marker = self._collect(batch)
                wrote = self._write(batch) if batch else False
                if marker is not None:
                    marker.ok = self._retry_failed()
                elif self._failed and (wrote or time.monotonic() >= self._next_retry):
                    self._retry_later()
            except Exception:  # noqa: BLE001 - the thread must survive anything
                logger.exception("LogWriter loop error; keeping %d rows for retry", len(batch))
                # Skip rows _write already kept: a row written twice would count twice.
                kept = {id(r) for r in self._failed}
                self._keep([r for r in batch if id(r) not in kept])
            finally:
                if marker is not None:
                    marker.event.set()  # ok stays False on error
            with self._lock:
                # _blocked_puts before empty(): once it is 0 after close, no put
                # can still arrive, so an empty queue is final.
                done = self._closed and self._blocked_puts == 0
            if done and self._q.empty():
                break
        self._retry_failed()

    def _collect(self, batch: list[dict[str, Any]]) -> _Flush | None:
        """Fill ``batch``; return a flush marker if one ended the batch."""
        try:
            item = self._q.get(timeout=self.flush_interval)
        except queue.Empty:
            return None
        deadline = time.monotonic() + self.flush_interval
        while True:
            if isinstance(item, _Flush):
                return item
            if item is _WAKE:
                return None  # closing: write what we have now
            batch.append(item)
            remaining = deadline - time.monotonic()
            if len(batch) >= self.batch_size or remaining <= 0:
                return None
            try:
                item = self._q.get(timeout=remaining)
            except queue.Empty:
                return None

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        """Insert ``rows`` with retries; on final failure keep them in _failed."""
        attempt = 0
        while True:
            try:
                self.store.insert_completions(rows)
            except Exception as exc:  # noqa: BLE001 - any failure must keep the rows
                with self._lock:
                    self.failures += 1
                if _is_data_error(exc):
                    if len(rows) > 1:
                        # Retrying the batch cannot help: isolate the bad rows so
                        # the good ones land (list, not generator: try every row).
                        return all([self._write([r]) for r in rows])
                    logger.error("LogWriter: row %r rejected: %s", rows[0].get("id"), exc)
                    break
                attempt += 1
                if attempt > self.max_retries:
                    logger.error("LogWriter: %d rows failed %d times, kept for retry: %s",
                                 len(rows), attempt, exc)
                    break
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            else:
                with self._lock:
                    self.written += len(rows)
                return True
        self._keep(rows)
        return False

    def _keep(self, rows: list[dict[str, Any]]) -> None:
        """Add dead letters, dropping the oldest beyond max_failed (counted and logged)."""
        if not self._failed:  # the first dead letter: the idle retry waits one interval
            self._next_retry = time.monotonic() + self._retry_wait
        self._failed.extend(rows)
        over = len(self._failed) - self.max_failed
        if over > 0:
            del self._failed[:over]
            with self._lock:
                self.dropped += over
            logger.error("LogWriter: %d dead-letter rows dropped (more than %d kept); %d dropped so far",
                         over, self.max_failed, self.dropped)

    def _retry_later(self) -> None:
        """The idle retry of the dead letters: at once when a write just succeeded (the store is
        back), else on a timer that doubles while the store stays down."""
        if self._retry_failed():
            self._retry_wait = self.retry_interval
        else:
            self._retry_wait = min(self._retry_wait * 2, self.max_retry_interval)
        self._next_retry = time.monotonic() + self._retry_wait

    def _retry_failed(self) -> bool:
        """Retry the dead letters once (with the usual retries); True if none remain."""
        rows, self._failed = self._failed, []
        for i in range(0, len(rows), self.batch_size):
            before = self.written  # only this thread increments it
            if not self._write(rows[i:i + self.batch_size]) and self.written == before:
                # Nothing landed: the store is still down, do not hammer it with
                # the rest. (If some rows landed, only bad rows failed: go on.)
                self._keep(rows[i + self.batch_size:])
                break
        return not self._failed
