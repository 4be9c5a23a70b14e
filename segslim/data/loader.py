"""Ordered, bounded-prefetch loading in worker processes (training batches, eval samples).

Each forked worker has a pipe of its own and takes every num_workers-th item, so results come
back in order by reading the workers in turn; at most 2 * num_workers results wait in memory.
An error raised in a worker (a UserError about a bad label, say) reaches the caller as it was
raised; a worker that dies (out of memory, say) is one error line naming its exit code. No
lock is shared with the workers, so stopping them (killed mid-write) cannot leave the caller
waiting on one, as multiprocessing.Pool.terminate could.
"""
import itertools
import multiprocessing
import signal
from typing import Any, Callable, Generator, Iterable, List, Tuple

from segslim.errors import UserError

_AHEAD = 2  # items in flight per worker
_END = object()


def _serve(conn: Any, fn: Callable[[Any, Any], Any], dataset: Any) -> None:
    """A worker's loop: items in, (ok, result or exception) out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: Tuple[bool, Any] = (True, fn(dataset, item))
        except Exception as exc:  # noqa: BLE001 - handed to the caller as raised
            reply = (False, exc)
        try:
            conn.send(reply)
        except (BrokenPipeError, ConnectionResetError):
            return  # the caller closed its end: it stops reading
        except Exception as exc:  # noqa: BLE001 - a result or exception that cannot pickle
            conn.send((False, RuntimeError(f'a loader worker could not send its result for '
                                           f'item {item!r}: {exc}')))


def _send(conn: Any, item: Any) -> None:
    try:
        conn.send(item)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker died: reading its next result says so


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
    ctx = multiprocessing.get_context('fork')
    workers: List[Tuple[Any, Any]] = []
    try:
        for _ in range(num_workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs, fn, dataset), daemon=True)
            proc.start()
            theirs.close()
            workers.append((proc, mine))
        sent = 0
        for item in itertools.islice(items, _AHEAD * num_workers):
            _send(workers[sent % num_workers][1], item)
            sent += 1
        done = 0
        while done < sent:
            proc, conn = workers[done % num_workers]
            done += 1
            try:
                ok, result = conn.recv()
            except (EOFError, OSError):
                proc.join(5)
                raise UserError(f'a data loader worker process ended unexpectedly (exit code '
                                f'{proc.exitcode}): if it ran out of memory, lower '
                                f'--num_workers or batch_size') from None
            if not ok:
                raise result
            item = next(items, _END)
            if item is not _END:
                _send(workers[sent % num_workers][1], item)
                sent += 1
            yield result
    finally:
        for proc, conn in workers:
            if proc.exitcode is None:
                proc.kill()
            conn.close()
        for proc, _ in workers:
            proc.join()

