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
from typing import Any, Callable, Optional

from segslim.errors import UserError

TMP_MARK = '.tmp-'
OLD_MARK = '.old-'


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) on a temporary file beside `path`, then renames it into place."""
    tmp = f'{path}{TMP_MARK}{uuid.uuid4().hex[:8]}{os.path.splitext(path)[1]}'
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
        return UserError(f'disk full while writing {target}; free space and resume from the last '
                         'complete checkpoint (it is intact)')
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return UserError(f'cannot write {target} ({e.strerror}); choose a writable --save_dir')
    return UserError(f'cannot write {target} ({e})')


def atomic_dir(final: str, fill: Callable[[str], None]) -> None:
    """Calls fill(tmp_dir) on a fresh folder beside `final`, syncs it, and renames it to
    `final`; an existing `final` is swapped out and removed only after the new one is in
    place. A failing OS call becomes one UserError line; nothing half-written remains."""
    parent = os.path.dirname(os.path.abspath(final))
    tmp = f'{final}{TMP_MARK}{uuid.uuid4().hex[:8]}'
    try:
        os.makedirs(parent, exist_ok=True)
        os.makedirs(tmp)
        fill(tmp)
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):
            old = f'{final}{OLD_MARK}{uuid.uuid4().hex[:8]}'
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(parent)
        if old:
            remove_path(old)
    except OSError as e:
        remove_path(tmp)
        raise _explain_os_error(e, final) from e
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


def check_writable(save_dir: str, flag: str = '--save_dir') -> None:
    """Fails early, creating nothing, when save_dir (or the folder it would be made in)
    cannot be written."""
    path = os.path.abspath(save_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {save_dir} is a file; choose a folder')
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError('{} {} is not writable ({} is {}); choose another folder'.format(
            flag, save_dir, parent, 'a file' if not os.path.isdir(parent) else 'read-only'))


def check_output_file(path: Optional[str], flag: str) -> None:
    """Fails early, before any work, when an output file like --json cannot be written."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder; give a file name')
    if not os.path.isdir(folder):
        raise UserError(f'{flag} {path}: folder {folder} does not exist; create it or choose '
                        'another path')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {path}: folder {folder} is read-only; choose another path')
