"""The package logger: one format for every script; progress bars with an ETA on a
terminal; and silencing native libraries' own prints."""
import contextlib
import logging
import os
import sys
from typing import Any, Iterable, List, Optional, Tuple, TypeVar

T = TypeVar('T')

logger = logging.getLogger('segslim')
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s',
                                            datefmt='%Y-%m-%d %H:%M:%S'))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterable[T]:
    """`items` with a progress bar and ETA on a terminal (tqdm, on stderr); plain `items`
    when stderr is not a terminal (logs, CI, pipes)."""
    if not sys.stderr.isatty() or os.environ.get('SEGSLIM_NO_PROGRESS'):
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar to update() by hand, drawn on a copy of stderr (so it survives
    quiet_native_output); None when stderr is not a terminal."""
    if not sys.stderr.isatty() or os.environ.get('SEGSLIM_NO_PROGRESS'):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                file=os.fdopen(os.dup(2), 'w'))


@contextlib.contextmanager
def quiet_native_output(enabled: bool = True):
    """Silences what native code prints to stdout/stderr (oneDNN passes, PaddleSlim PTQ,
    paddle2onnx) unless SEGSLIM_DEBUG is set; the package's own log lines still show."""
    if os.environ.get('SEGSLIM_DEBUG') or not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    kept = _log_to_copies(saved)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        for handler, stream, copy in kept:
            handler.setStream(stream)
            copy.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def _log_to_copies(saved: List[int]) -> List[Tuple[logging.StreamHandler, Any, Any]]:
    """Points the package's handlers that write to fd 1 or 2 at copies of those fds (taken
    before they are silenced); returns (handler, its stream, the copy) to undo it."""
    kept = []
    for handler in logger.handlers:
        if not isinstance(handler, logging.StreamHandler):
            continue
        try:
            fd = handler.stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        if fd in (1, 2):
            handler.flush()
            copy = os.fdopen(os.dup(saved[fd - 1]), 'w')
            kept.append((handler, handler.setStream(copy), copy))
    return kept
