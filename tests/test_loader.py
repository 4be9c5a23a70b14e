"""segslim.data.loader.ordered_map: order, bounded prefetch, errors from workers, clean stop."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from segslim.data.loader import ordered_map
from segslim.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _square(dataset, item):
    return dataset[item] ** 2


def _bad_label(dataset, item):
    if item == 3:
        raise UserError(f'labels of sample {item} are out of range')
    return np.full(dataset, item, np.float32)  # large results: the pipes fill up


def _exit(dataset, item):
    if item == 2:
        os._exit(3)  # a worker killed from outside (out of memory, say)
    return item


def _children():
    """Live child processes of this one (zombies reaped by now are gone from /proc)."""
    found = []
    for name in os.listdir('/proc'):
        try:
            with open(f'/proc/{name}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != 'Z':
            found.append(int(name))
    return found


@pytest.fixture
def no_workers_left():
    """Fails the test if it leaves a child process behind (a server another test file
    started in this pytest process is there before and after)."""
    before = set(_children())
    yield
    assert set(_children()) <= before


@pytest.mark.parametrize('workers', [0, 1, 3])
def test_results_in_order(workers, no_workers_left):
    data = list(range(20))
    assert list(ordered_map(_square, range(20), data, workers)) == [i * i for i in data]


def test_error_in_worker_reaches_caller(no_workers_left):
    for _ in range(3):
        with pytest.raises(UserError, match='sample 3'):
            for _ in ordered_map(_bad_label, range(12), 1 << 20, 2):
                pass


def test_worker_that_dies_is_an_error_not_a_hang(no_workers_left):
    with pytest.raises(UserError, match='exit code 3'):
        list(ordered_map(_exit, range(8), None, 2))


def test_closing_early_stops_the_workers(no_workers_left):
    gen = ordered_map(_bad_label, range(100), 1 << 18, 2)
    assert next(gen).shape == (1 << 18,)
    gen.close()


def test_no_hang_when_a_worker_raises_beside_large_results():
    """A worker raising while the others write large results: stopping the pool once
    waited forever on a lock a killed worker held. Many rounds in a process of its own."""
    code = textwrap.dedent('''
        import sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np
        from segslim.data.loader import ordered_map
        from segslim.errors import UserError
        from tests.test_loader import _bad_label
        for _ in range(40):
            try:
                for _ in ordered_map(_bad_label, range(12), 1 << 21, 2):
                    pass
            except UserError:
                pass
        print('ok')
    ''')
    out = subprocess.run([sys.executable, '-c', code, ROOT], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.stdout.strip() == 'ok', out.stderr[-2000:]
