"""A log line every so often while a loop over many images runs (evaluate; predict without a terminal).

Training has its own (segflow.training.callbacks, ``train.log_every_s``); this is the same idea for loops
outside Lightning, so a long evaluation or prediction shows it is alive in the log and the dashboard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: Seconds between progress lines (the default of train.log_every_s).
EVERY_S = 30.0


def logged(items: Iterable[T], total: int, what: str, log: logging.Logger, every_s: float = EVERY_S) -> Iterator[T]:
    """Yield ``items``, logging ``what: n/total, x images/s, ETA`` at most every ``every_s`` seconds.

    Nothing is logged for a loop that ends within ``every_s``; ``every_s`` 0 logs nothing.
    """
    started = last = time.perf_counter()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.perf_counter()
        if every_s and now - last >= every_s and done < total:
            rate = done / (now - started)
            log.info("%s: %d/%d images, %.2f images/s, ETA %s", what, done, total, rate, _eta((total - done) / rate))
            last = now


def _eta(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
