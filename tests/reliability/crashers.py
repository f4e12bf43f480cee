"""Module-level functions for optimizer.verify.isolation tests: a spawned child must import them."""

from __future__ import annotations

import os
import sys
import time

from optimizer.errors import FeedError


def abort_after_message(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os.abort()


def sleep_then_return(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def allocate(size_bytes: int) -> int:
    return len(bytearray(size_bytes))


def raise_feed_error() -> None:
    raise FeedError("sample 0: input 'x' is missing")


def raise_key_error() -> None:
    raise KeyError("a bug")


def exit_quietly(code: int) -> None:
    os._exit(code)
