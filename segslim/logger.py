"""The package logger: one format for every script."""
import logging
import sys

logger = logging.getLogger('segslim')
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s',
                                            datefmt='%Y-%m-%d %H:%M:%S'))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
