"""Element-wise sums of small float vectors over the processes of one local job, through a
file in shared memory: a few microseconds where gloo over loopback takes about half a
millisecond, which matters for the two sums per batch norm and step that the CPU sync
batch norm needs (one process waits for the others at each of them).

Layout of the file: per process a sequence number and two buffers of SLOT values. A call
writes the vector into buffer (n % 2), then publishes n as its sequence number, waits until
every process has published n and sums all processes' buffers in rank order, so every
process gets the same bits. A process cannot be two calls ahead of another (it waits for
everyone at each call), so the buffer it overwrites was read by all. x86 keeps stores and
loads in program order (TSO), which this relies on; other CPUs use gloo."""
import mmap
import os
import platform
import time
from typing import List, Optional

import numpy as np

ENV = 'SEGSLIM_SHARED_SUM'  # the file, set by local_job for the processes it starts
SLOT = 1 << 15  # float64 values per buffer; longer vectors go through gloo
_HEADER = 8  # bytes: the sequence number
_PER_RANK = _HEADER + 2 * 8 * SLOT
TIMEOUT_S = 1800.0


def file_size(processes: int) -> int:
    return processes * _PER_RANK


def available() -> bool:
    return platform.machine().lower() in ('x86_64', 'amd64')


class SharedSum:
    """The sums of one process (rank) of `processes`, over the file at `path`."""

    def __init__(self, path: str, rank: int, processes: int) -> None:
        self.rank, self.processes = rank, processes
        with open(path, 'r+b') as f:
            self._map = mmap.mmap(f.fileno(), file_size(processes))
        self._seq: List[np.ndarray] = [
            np.ndarray((1,), np.int64, self._map, r * _PER_RANK) for r in range(processes)]
        self._data: List[List[np.ndarray]] = [
            [np.ndarray((SLOT,), np.float64, self._map, r * _PER_RANK + _HEADER + b * 8 * SLOT)
             for b in range(2)] for r in range(processes)]
        self._calls = int(self._seq[rank][0])

    def __call__(self, values: np.ndarray) -> np.ndarray:
        flat = np.asarray(values, np.float64).reshape(-1)
        if flat.size > SLOT:
            raise ValueError(f'{flat.size} values: more than {SLOT}')
        self._calls += 1
        n, buf = self._calls, self._calls % 2
        self._data[self.rank][buf][:flat.size] = flat
        self._seq[self.rank][0] = n  # after the data: other processes read it once they see n
        for r in range(self.processes):
            self._wait(r, n)
        total = np.zeros(flat.size, np.float64)
        for r in range(self.processes):
            total += self._data[r][buf][:flat.size]
        return total.reshape(np.shape(values)).astype(np.asarray(values).dtype)

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


_SUMS: List[SharedSum] = []


def local_sum(rank: int, processes: int) -> Optional[SharedSum]:
    """This process's SharedSum when it runs in a local job on x86, else None."""
    path = os.environ.get(ENV)
    if not path or not available():
        return None
    if not _SUMS:
        _SUMS.append(SharedSum(path, rank, processes))
    return _SUMS[0]
