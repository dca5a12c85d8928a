"""The mount's worker threads (`fusefs.workers`): what its handlers rely on when they hand a commit,
a registry transaction or an fsync to a thread."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from fusefs.workers import LIMIT, Workers


def test_jobs_beyond_the_thread_limit_wait_for_a_thread_and_all_of_them_run() -> None:
    workers, gate, lock = Workers(), threading.Event(), threading.Lock()
    running = peak = 0
    done: list[int] = []

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        gate.wait(10)
        with lock:
            running -= 1
            done.append(i)
        return i

    async def main() -> list[int]:
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await workers.run(lambda: job(i)))

        async with trio.open_nursery() as nursery:
            for i in range(LIMIT + 5):
                nursery.start_soon(one, i)
            with trio.fail_after(10):
                while running < LIMIT:  # every thread is taken, five jobs wait
                    await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert running == LIMIT and not done
            gate.set()
        return results

    results = trio.run(main)
    assert sorted(results) == list(range(LIMIT + 5))
    assert peak == LIMIT


def test_a_started_job_runs_to_its_end_when_its_task_is_cancelled() -> None:
    """A commit handed to a thread is never left half made: the task waits for it, cancelled or not."""
    workers = Workers()
    finished: list[float] = []

    def commit() -> str:
        time.sleep(0.3)
        finished.append(time.monotonic())
        return "committed"

    async def main() -> tuple[str, float, bool]:
        with trio.move_on_after(0.05) as scope:
            outcome = await workers.run(commit)
        return outcome, time.monotonic(), scope.cancelled_caught

    outcome, returned, cancelled = trio.run(main)
    assert outcome == "committed" and not cancelled
    assert finished and finished[0] <= returned


def test_an_error_in_a_job_is_raised_in_its_task() -> None:
    workers = Workers()

    def fails() -> None:
        raise PermissionError(13, "refused", "plans/a.md")

    async def main() -> None:
        with pytest.raises(PermissionError, match="refused"):
            await workers.run(fails)
        assert await workers.run(lambda: 42) == 42  # the thread serves on

    trio.run(main)


def test_a_forked_child_gets_threads_of_its_own() -> None:
    """Threads do not follow a fork: a child whose parent had idle workers must not hand its jobs
    to them (it would wait forever)."""
    workers = Workers()
    assert trio.run(workers.run, lambda: os.getpid()) == os.getpid()  # leaves an idle thread
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if trio.run(workers.run, lambda: os.getpid()) == os.getpid() else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 10
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    if waited == (0, 0):
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert waited[0] == pid and os.waitstatus_to_exitcode(waited[1]) == 0
