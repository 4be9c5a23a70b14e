"""Memory must not grow with the val set: benchmark.py scores, compares and picks its gallery
image by image."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import INSTANT, ROOT

from segslim.data.demo import make_demo_dataset

RSS_CODE = '''
import resource, runpy, sys
sys.argv = ['benchmark.py'] + sys.argv[1:]
try:
    runpy.run_path({script!r}, run_name='__main__')
except SystemExit as e:
    assert not e.code, e.code
print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''


def max_rss_mb(exported, root, tmp_path):
    script = os.path.join(ROOT, 'deploy', 'python', 'benchmark.py')
    opts = [f'{k}.dataset_root={root}' for k in ('train_dataset', 'val_dataset')]
    args = ['--config', INSTANT, '--model_dirs', exported['fp32'], exported['int8'],
            '--backend', 'paddle', '--input_shape', 1, 3, 64, 64, '--warmup', 1, '--repeats', 1,
            '--no_bf16',
            '--no_ceiling',
            '--report_dir', tmp_path / 'report', '--opts', *opts]
    proc = subprocess.run([sys.executable, '-c', RSS_CODE.format(script=script)] +
                          [str(a) for a in args], capture_output=True, text=True, timeout=900,
                          cwd=ROOT, env=dict(os.environ, SEGSLIM_OFFLINE='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kb = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith('maxrss_kb')]
    return int(kb[0]) / 1024


@pytest.mark.slow
def test_benchmark_memory_does_not_grow_with_the_val_set(exported, tmp_path):
    # 20 distinct 160x160 images, listed 2x and 20x: a val set of 40 and one of 400 (a
    # benchmark that keeps every row's int64 label maps grows by over twice the margin). One
    # engine: scoring, comparing and the gallery are the same code for all of them.
    small = make_demo_dataset(str(tmp_path / 'small'), num_train=1, num_val=20, num_test=0,
                              size=160, seed=5)
    big = str(tmp_path / 'big')
    shutil.copytree(small, big)
    lines = open(os.path.join(small, 'val_list.txt')).read().splitlines(keepends=True)
    open(os.path.join(small, 'val_list.txt'), 'w').write(''.join(lines * 2))
    open(os.path.join(big, 'val_list.txt'), 'w').write(''.join(lines * 20))
    rss_40 = max_rss_mb(exported, small, tmp_path / '40')
    rss_400 = max_rss_mb(exported, big, tmp_path / '400')
    assert rss_400 <= 1.10 * rss_40, (rss_40, rss_400)
