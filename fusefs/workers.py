"""The worker threads the mount runs its blocking work in (registry transactions, commits, fsync).

`trio.to_thread.run_sync` does the same at a cost, measured in the daemon, of about 45 µs more per
call than this module (~90 µs against ~45 µs for a call that does nothing): per call it names the
worker thread through ctypes twice, copies the context and takes a capacity limiter. A managed
atomic save makes four such calls. So the mount keeps threads of its own, as trio's thread cache
does: the thread that went idle last takes the next job (its caches are the warmest), a job
hands its outcome back to its waiting task through the trio token, and past LIMIT threads jobs
wait, in order, for one to be free. As with `trio.to_thread.run_sync`, a job that started runs to
its end even if its task is cancelled (a commit is never left half made).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

LIMIT = 40
"""Threads at most (trio's default thread limiter): jobs beyond wait for one of them."""

_Job = tuple[Callable[[], Any], trio.lowlevel.Task, trio.lowlevel.TrioToken]


class _Thread:
    """One worker thread: it waits on `wake` for the job put in `job`."""

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: _Job | None = None


class Workers:
    """Threads that run blocking jobs for trio tasks."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the threads do not follow a fork

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Thread] = []
        """Threads waiting for a job, the one idle last at the end."""
        self._threads = 0
        self._waiting: collections.deque[_Job] = collections.deque()
        """Jobs waiting for a thread (all LIMIT are busy)."""

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in a worker thread; return what it returns (or raise what it raises)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        job = (fn, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            start = worker is None and self._threads < LIMIT
            if start:
                self._threads += 1
            elif worker is None:
                self._waiting.append(job)
        if worker is not None:
            worker.job = job
            worker.wake.release()
        elif start:
            worker = _Thread()
            worker.job = job
            try:
                threading.Thread(target=self._serve, args=(worker,), name="coherent-volume worker", daemon=True).start()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                raise
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _serve(self, me: _Thread) -> None:
        """Run jobs until the process ends. A job's outcome is handed back as the thread's last step
        before it waits for the next one: the woken trio thread then meets no other Python code of
        this one competing for the interpreter lock."""
        job, me.job = me.job, None
        while True:
            assert job is not None
            fn, task, token = job
            result = outcome.capture(fn)
            del fn, job
            with self._lock:
                job = self._waiting.popleft() if self._waiting else None
                if job is None:
                    self._idle.append(me)  # from here on `run` may give it a job (and release `wake`)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the mount's loop ended while the job ran: nobody waits for it
            del task, token, result
            if job is None:
                me.wake.acquire()
                job, me.job = me.job, None
