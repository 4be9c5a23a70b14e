"""The one exception type for mistakes a user can fix, and the one way an optional package
is imported or named with how to install it."""
import importlib
from typing import Any


class UserError(Exception):
    """A problem with the user's input (a path, a config key, weights, data).

    The message is a single line that names the file or key and says what to do;
    the command-line edge prints it without a traceback.
    """


def require(module: str, needed_by: str, extra: str, instead: str = '') -> Any:
    """The optional package `module`, imported; else a UserError saying that `needed_by` (a
    flag) needs it, how to install it (setup.py's extra `extra`) and, given, what to use
    `instead`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        tail = f', or use {instead}' if instead else ''
        raise UserError(f'{needed_by} needs the {module} package: pip install -e .[{extra}] '
                        f'(make install does it){tail}') from None
