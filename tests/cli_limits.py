"""Limits for tests that run commands: a time limit for in-process runs (SIGALRM) and a memory limit for
subprocesses (RLIMIT_AS), so that a regression fails the test instead of hanging it or exhausting the machine."""

from __future__ import annotations

import contextlib
import resource
import signal

MEMORY_LIMIT = 6 << 30  # address space of a subprocess: torch maps a few GiB; 10^14 seeds would need far more


class TimeLimit(BaseException):
    """Raised by the alarm: a BaseException, so that no handler in the code under test swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises TimeLimit in the main thread if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeLimit(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def limit_memory():
    """preexec_fn for subprocess: caps the child's address space at MEMORY_LIMIT."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
