"""Atomic writes, the one mechanism for everything a run produces: a reader (or a run
killed mid-write) sees the old file or folder or the new one, never half of one.

Files go through a temporary beside the target that is renamed into place
(`atomic_write`); folders (checkpoints) are filled under a temporary name and swapped in
(`atomic_dir`); `recover` cleans up after a kill between the two steps of a swap."""
import errno
import glob
import json
import os
import shutil
import uuid
from typing import Any, Callable

from segslim.errors import UserError

TMP_MARK = '.tmp-'
OLD_MARK = '.old-'


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) on a temporary file beside `path`, then renames it into place."""
    tmp = '{}{}{}{}'.format(path, TMP_MARK, uuid.uuid4().hex[:8], os.path.splitext(path)[1])
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def move_into_place(src: str, path: str) -> None:
    """A finished file (on the same filesystem) replaces `path` atomically."""
    atomic_write(path, lambda tmp: os.replace(src, tmp))


def write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(data)
    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode('utf-8'))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2))


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def _explain_os_error(e: OSError, target: str) -> UserError:
    if e.errno == errno.ENOSPC:
        return UserError('disk full while writing {}; free space and resume from the last '
                         'complete checkpoint (it is intact)'.format(target))
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return UserError('cannot write {} ({}); choose a writable --save_dir'.format(
            target, e.strerror))
    return UserError('cannot write {} ({})'.format(target, e))


def atomic_dir(final: str, fill: Callable[[str], None]) -> None:
    """Calls fill(tmp_dir) on a fresh folder beside `final`, syncs it, and renames it to
    `final`; an existing `final` is swapped out and removed only after the new one is in
    place. A failing OS call becomes one UserError line; nothing half-written remains."""
    parent = os.path.dirname(os.path.abspath(final))
    tmp = '{}{}{}'.format(final, TMP_MARK, uuid.uuid4().hex[:8])
    try:
        os.makedirs(parent, exist_ok=True)
        os.makedirs(tmp)
        fill(tmp)
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):
            old = '{}{}{}'.format(final, OLD_MARK, uuid.uuid4().hex[:8])
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(parent)
        if old:
            remove_path(old)
    except OSError as e:
        remove_path(tmp)
        raise _explain_os_error(e, final)
    except BaseException:
        remove_path(tmp)
        raise


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, 'rb') as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(folder: str) -> None:
    """Cleans leftovers of a killed write in `folder`: restores a swapped-out folder whose
    replacement never landed and removes unfinished temporaries."""
    for old in glob.glob(os.path.join(folder, '*' + OLD_MARK + '*')):
        final = old.split(OLD_MARK)[0]
        if not os.path.exists(final):
            os.replace(old, final)
        else:
            remove_path(old)
    for tmp in glob.glob(os.path.join(folder, '*' + TMP_MARK + '*')):
        remove_path(tmp)
