"""Ordered, bounded-prefetch loading in worker processes (training batches, eval samples).

Unlike an unbounded Pool.imap, at most 2 * num_workers results wait in memory, and an error
raised in a worker (a UserError about a bad label, say) reaches the caller as it was raised.
"""
import collections
import itertools
import multiprocessing
import signal
from typing import Any, Callable, Generator, Iterable

_DATASET: Any = None
_END = object()


def _init_worker(dataset: Any) -> None:
    global _DATASET
    _DATASET = dataset
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def _call(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    return fn(_DATASET, item)


def ordered_map(fn: Callable[[Any, Any], Any], items: Iterable[Any], dataset: Any,
                num_workers: int = 0) -> Generator[Any, None, None]:
    """Yields fn(dataset, item) for each item, in order. With num_workers > 0, forked worker
    processes compute up to 2 * num_workers results ahead; `fn` must be a module-level
    function. Closing the generator stops the workers."""
    items = iter(items)
    if num_workers <= 0:
        for item in items:
            yield fn(dataset, item)
        return
    pool = multiprocessing.get_context('fork').Pool(num_workers, _init_worker, (dataset,))
    try:
        pending: collections.deque = collections.deque(
            pool.apply_async(_call, (fn, item)) for item in itertools.islice(
                items, 2 * num_workers))
        while pending:
            result = pending.popleft().get()
            item = next(items, _END)
            if item is not _END:
                pending.append(pool.apply_async(_call, (fn, item)))
            yield result
    finally:
        pool.terminate()
