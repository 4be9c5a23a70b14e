"""The package logger: one format for every script; and silencing native libraries' own
prints."""
import contextlib
import logging
import os
import sys

logger = logging.getLogger('segslim')
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s',
                                            datefmt='%Y-%m-%d %H:%M:%S'))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextlib.contextmanager
def quiet_native_output(enabled: bool = True):
    """Silences what native code prints to stdout/stderr (oneDNN passes, PaddleSlim PTQ,
    paddle2onnx) unless SEGSLIM_DEBUG is set."""
    if os.environ.get('SEGSLIM_DEBUG') or not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)
