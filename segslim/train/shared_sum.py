"""Element-wise sums of float vectors over the processes of one local job, through files in
shared memory: a few microseconds where gloo over loopback takes about half a millisecond,
which matters for the two sums per batch norm and step that the CPU sync batch norm needs
(one process waits for the others at each of them), and the gradients of every step
(paddle.DataParallel's reducer over gloo costs 5-10 % of a CPU step).

Layout of a file: per process a sequence number and two buffers of `slot` values. A call
writes the vector into buffer (n % 2), then publishes n as its sequence number, waits until
every process has published n and sums all processes' buffers in rank order, so every
process gets the same bits. A process cannot be two calls ahead of another (it waits for
everyone at each call), so the buffer it overwrites was read by all. x86 keeps stores and
loads in program order (TSO), which this relies on; other CPUs use gloo.

The job's files share one path prefix (ENV): `<prefix>small` (float64, SLOT values, made by
local_job) and one `<prefix>float32-<size>` per gradient size, made by the first process that
asks for it. Each is unlinked after its first sum, so a job killed after its first step
leaves nothing in shared memory."""
import mmap
import os
import platform
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

ENV = 'SEGSLIM_SHARED_SUMS'  # the path prefix, set by local_job for the processes it starts
SMALL = 'small'
SLOT = 1 << 15  # float64 values per buffer of `small`; longer vectors go through gloo
_HEADER = 8  # bytes: the sequence number
TIMEOUT_S = 1800.0


def file_size(processes: int, slot: int = SLOT, dtype: type = np.float64) -> int:
    return processes * (_HEADER + 2 * np.dtype(dtype).itemsize * slot)


def available() -> bool:
    return platform.machine().lower() in ('x86_64', 'amd64')


class SharedSum:
    """The sums of one process (rank) of `processes`, over the file at `path` (of
    file_size(processes, slot, dtype) bytes): vectors of up to `slot` values of `dtype`."""

    def __init__(self, path: str, rank: int, processes: int, slot: int = SLOT,
                 dtype: type = np.float64) -> None:
        self.rank, self.processes, self.slot, self.path = rank, processes, slot, path
        per_rank, itemsize = file_size(1, slot, dtype), np.dtype(dtype).itemsize
        with open(path, 'r+b') as f:
            self._map = mmap.mmap(f.fileno(), file_size(processes, slot, dtype))
        self._seq: List[np.ndarray] = [
            np.ndarray((1,), np.int64, self._map, r * per_rank) for r in range(processes)]
        self._data: List[List[np.ndarray]] = [
            [np.ndarray((slot,), dtype, self._map, r * per_rank + _HEADER + b * itemsize * slot)
             for b in range(2)] for r in range(processes)]
        self._calls = int(self._seq[rank][0])
        self._on_disk = True

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """The sum over processes of `values` (any shape, at most `slot` values), in their
        shape and dtype."""
        total = self.sum_parts([np.asarray(values).reshape(-1)])
        return total.reshape(np.shape(values)).astype(np.asarray(values).dtype)

    def sum_parts(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The sum over processes of the concatenation of `parts` (flat arrays), as one
        new vector of the file's dtype; each part is copied into shared memory once."""
        size = sum(p.size for p in parts)
        if size > self.slot:
            raise ValueError(f'{size} values: more than {self.slot}')
        self._calls += 1
        n, buf = self._calls, self._calls % 2
        mine = self._data[self.rank][buf]
        offset = 0
        for part in parts:
            np.copyto(mine[offset:offset + part.size], part.reshape(-1), casting='same_kind')
            offset += part.size
        self._seq[self.rank][0] = n  # after the data: other processes read it once they see n
        for r in range(self.processes):
            self._wait(r, n)
        if self._on_disk and self.rank == 0:  # every process mapped it to reach this sum
            self.unlink()
        total = self._data[0][buf][:size].copy()
        for r in range(1, self.processes):
            total += self._data[r][buf][:size]
        return total

    def unlink(self) -> None:
        """Removes the file once every process has mapped it (after the first sum): the
        processes keep using its memory, and a killed job leaves nothing of it behind."""
        self._on_disk = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _wait(self, rank: int, n: int) -> None:
        seq = self._seq[rank]
        spins = 0
        start: Optional[float] = None
        while seq[0] < n:
            spins += 1
            if spins % 4096 == 0:  # another process is far behind: give the core away
                time.sleep(0)
                start = start or time.monotonic()
                if time.monotonic() - start > TIMEOUT_S:
                    raise RuntimeError(f'process {rank} of the local job did not reach sum '
                                       f'{n} within {TIMEOUT_S:.0f} s')


_SUMS: Dict[str, SharedSum] = {}


def local_sum(rank: int, processes: int) -> Optional[SharedSum]:
    """This process's SharedSum of small float64 vectors when it runs in a local job on
    x86, else None."""
    prefix = os.environ.get(ENV)
    if not prefix or not available():
        return None
    if SMALL not in _SUMS:
        _SUMS[SMALL] = SharedSum(prefix + SMALL, rank, processes)
    return _SUMS[SMALL]


def local_float32_sum(rank: int, processes: int, size: int) -> Optional[SharedSum]:
    """This process's SharedSum of float32 vectors of up to `size` values when it runs in a
    local job on x86 and shared memory has room for it, else None. The first process
    to ask makes the file; it takes memory only as far as it is written (tmpfs)."""
    prefix = os.environ.get(ENV)
    if not prefix or not available():
        return None
    name = f'float32-{size}'
    if name not in _SUMS:
        path, nbytes = prefix + name, file_size(processes, size, np.float32)
        stat = os.statvfs(os.path.dirname(path) or '.')
        if stat.f_bavail * stat.f_frsize < 2 * nbytes:
            return None
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < nbytes:
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        _SUMS[name] = SharedSum(path, rank, processes, size, np.float32)
    return _SUMS[name]
