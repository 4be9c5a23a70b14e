"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one,
never half of one. Checkpoint folders have their own folder-level version in
segslim.engine.checkpoint."""
import json
import os
import uuid
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) on a temporary file beside `path`, then renames it into place."""
    tmp = '{}.tmp-{}{}'.format(path, uuid.uuid4().hex[:8], os.path.splitext(path)[1])
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(data)
    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode('utf-8'))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2))
