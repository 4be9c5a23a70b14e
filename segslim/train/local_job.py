"""Training on every core of a CPU machine: the command runs again as N local processes of
one data-parallel job (gloo), each on its share of the cores and of each step's batch.

Paddle 2.6's CPU training kernels for depthwise convolution, element-wise ops, batch norm,
bilinear resize and cross entropy run on one thread whatever the thread count, so threads
alone leave cores idle; processes use them. Each step still reads --batch_size images in all
(batch_size / N per process) and batch norm normalises over all of them
(sync_batch_norm), so a run trains what one process trains, up to the order of float sums.
The processes are started the way `paddle.distributed.launch` starts them (the same
environment variables); the first one writes to this terminal, the others to a log file
that is shown when one of them fails."""
import contextlib
import glob
import os
import signal
import socket
import subprocess
import tempfile
import time
from typing import IO, List, Optional

from segslim.errors import UserError
from segslim.logger import logger
from segslim.train import shared_sum

LAUNCHED = 'PADDLE_TRAINERS_NUM'  # set in every process of a data-parallel job
CHILD = 'SEGSLIM_LOCAL_JOB'  # set in every process run_local_job starts


def under_launcher() -> bool:
    """True inside a process that paddle.distributed.launch or run_local_job started."""
    return int(os.environ.get(LAUNCHED, '1') or 1) > 1


def choose_processes(asked: Optional[int], threads: int, batch_size: int) -> int:
    """The processes for `threads` cores and a step of `batch_size` images: `asked` when
    given (it must divide the batch), else the most processes that split both the threads
    and the batch evenly (one per core on 2 cores with an even batch)."""
    if asked is not None:
        if batch_size % asked:
            raise UserError(f'--cpu_processes {asked} does not divide --batch_size '
                            f'{batch_size}: each process trains on an equal share of a step; '
                            'pass a divisor of the batch size')
        return asked
    return max(n for n in range(1, max(1, min(threads, batch_size)) + 1)
               if batch_size % n == 0 and threads % n == 0)


def _free_ports(n: int) -> List[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def job_environment(rank: int, processes: int, threads: int, ports: List[int]) -> dict:
    """What paddle.distributed.launch sets for a local CPU (gloo) process, plus its threads."""
    endpoints = [f'127.0.0.1:{p}' for p in ports[1:]]
    env = dict(os.environ)
    env.update({
        'PADDLE_MASTER': f'127.0.0.1:{ports[0]}', 'PADDLE_DISTRI_BACKEND': 'gloo',
        'PADDLE_TRAINER_ENDPOINTS': ','.join(endpoints),
        'PADDLE_CURRENT_ENDPOINT': endpoints[rank], 'PADDLE_NNODES': '1',
        'PADDLE_TRAINER_ID': str(rank), 'PADDLE_TRAINERS_NUM': str(processes),
        'PADDLE_GLOBAL_RANK': str(rank), 'PADDLE_GLOBAL_SIZE': str(processes),
        'PADDLE_LOCAL_RANK': str(rank), 'PADDLE_LOCAL_SIZE': str(processes),
        'PADDLE_RANK_IN_NODE': str(rank),
        'OMP_NUM_THREADS': str(threads), 'SEGSLIM_USER_OMP_NUM_THREADS': str(threads),
        CHILD: '1'})
    return env


def die_with_parent() -> None:
    """In a process of a local job: SIGTERM when the process that started it dies, even by
    SIGKILL (Linux), so no orphan keeps training."""
    if os.environ.get(CHILD) != '1':
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was gone before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def run_local_job(cmd: List[str], processes: int, threads: int, stdin: bytes = b'') -> int:
    """Runs `cmd` as `processes` local processes of one job with `threads` threads each, each
    given `stdin`; returns the job's exit code (the first failure's). The first process
    writes to this terminal; when another fails, the last line it wrote is logged."""
    shm = '/dev/shm' if os.path.isdir('/dev/shm') else None
    fd, small = tempfile.mkstemp(prefix='segslim-sums-', suffix='-' + shared_sum.SMALL, dir=shm)
    prefix = small[:-len(shared_sum.SMALL)]  # the job's shared-sum files all start with it
    try:
        os.ftruncate(fd, shared_sum.file_size(processes))
        os.close(fd)
        return _run(cmd, processes, threads, prefix, stdin)
    finally:  # normally unlinked after their first sum already
        for path in glob.glob(glob.escape(prefix) + '*'):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _run(cmd: List[str], processes: int, threads: int, sums: str, stdin: bytes) -> int:
    """`sums`: the path prefix of the job's shared-sum files (shared_sum.ENV)."""
    ports = _free_ports(processes + 1)
    children: List[subprocess.Popen] = []
    logs: List[Optional[IO[str]]] = []
    for rank in range(processes):
        out: Optional[IO[str]] = None if rank == 0 else tempfile.TemporaryFile(mode='w+')
        logs.append(out)
        env = job_environment(rank, processes, threads, ports)
        env[shared_sum.ENV] = sums
        child = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=out)
        children.append(child)
        try:
            child.stdin.write(stdin)  # type: ignore[union-attr]
            child.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:  # it died at start: _wait reports its exit code
            pass

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        first = _wait(children)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    code = 0 if first is None else children[first].returncode
    log = logs[first] if first is not None else None
    if log is not None:  # the first process, stopped, did not say why
        log.seek(0)
        lines = [ln for ln in log.read().splitlines() if ln.strip()]
        logger.error('process %d of %d failed: %s', first, processes,
                     lines[-1] if lines else f'exit code {code}')
    for log in logs:
        if log is not None:
            log.close()
    return code if code > 0 else (0 if code == 0 else 1)


def _wait(children: List[subprocess.Popen]) -> Optional[int]:
    """Waits for every child; when one fails, stops the others (a collective would wait
    for it until gloo's timeout). Returns the index of the first that failed, or None."""
    while True:
        codes = [c.poll() for c in children]
        bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                child.wait()
            return bad[0]
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.2)
