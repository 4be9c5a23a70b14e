import contextlib
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
INSTANT = os.path.join(ROOT, 'tests', 'configs', 'instant.yml')


def run_cli(script, *args, cwd=None, timeout=600, env=None):
    """Runs a repo script with the test interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ, SEGSLIM_OFFLINE='1', PYTHONWARNINGS='ignore')
    full_env.pop('SEGSLIM_DEBUG', None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args],
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


SCRIPTS = {  # the scripts' entry points, for in-process runs
    'train.py': 'train', 'val.py': 'val', 'export.py': 'export',
    'slim/quant/qat_train.py': 'qat_train', 'slim/quant/qat_val.py': 'qat_val',
    'slim/quant/qat_export.py': 'qat_export', 'slim/quant/ptq.py': 'ptq',
    'slim/quant/analysis.py': 'analysis', 'slim/quant/auto_quant.py': 'auto_quant',
    'deploy/python/infer.py': 'infer',
    'deploy/python/benchmark.py': 'benchmark', 'tools/make_demo_dataset.py': 'make_demo_dataset',
}


def run_command(script, *args, env=None):
    """Runs a repo script's command in this process (for paths that need no process of
    their own: argument and setup errors); returns a CompletedProcess like run_cli's."""
    from segslim import commands
    from segslim.logger import logger
    argv = [str(a) for a in args]
    # forked data workers would copy this process's threads' locks (a pytest-xdist worker's
    # among them) and can wait on one forever: runs with workers need run_cli
    assert not any(a == '--num_workers' and b != '0' for a, b in zip(argv, argv[1:])), \
        'run_cli for --num_workers > 0'
    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    os.environ.update(dict(SEGSLIM_OFFLINE='1', **(env or {})))
    os.environ.pop('SEGSLIM_DEBUG', None)
    streams = [(h, h.stream) for h in logger.handlers if hasattr(h, 'stream')]
    for handler, _ in streams:
        handler.setStream(out)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            getattr(commands, SCRIPTS[script])(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for handler, stream in streams:
            handler.setStream(stream)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *words, code=2):
    """Exit code 2 (a user mistake, not a crash), one `error:` line with `words`, no
    traceback and no usage dump."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1500:], proc.stderr)
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'usage:' not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def data_opts(root):
    return [f'{key}.dataset_root={root}' for key in ('train_dataset', 'val_dataset')]


@pytest.fixture(scope='session')
def instant_data(tmp_path_factory):
    from segslim.data.demo import make_demo_dataset
    root = str(tmp_path_factory.mktemp('data') / 'instant')
    make_demo_dataset(root, num_train=8, num_val=4, num_test=2, size=64, seed=3)
    return root


@pytest.fixture(scope='session')
def fp32_run(instant_data, tmp_path_factory):
    """A 20-iteration FP32 run of train.py with evaluation."""
    out = str(tmp_path_factory.mktemp('fp32'))
    proc = run_cli('train.py', '--config', INSTANT, '--do_eval', '--save_interval', 10, '--seed', 0,
                   '--use_vdl',
                   '--log_iters', 5, '--save_dir', out, '--opts', *data_opts(instant_data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {'dir': out, 'stdout': proc.stdout, 'data': instant_data}


@pytest.fixture(scope='session')
def qat_run(fp32_run, tmp_path_factory):
    """A 10-iteration qat_train.py run from the FP32 best model."""
    out = str(tmp_path_factory.mktemp('quant'))
    proc = run_cli('slim/quant/qat_train.py', '--config', INSTANT, '--model_path',
                   os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                   '--learning_rate', 0.001, '--iters', 10, '--do_eval', '--save_interval', 5,
                   '--seed', 0,
                   '--log_iters', 5, '--save_dir', out, '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {'dir': out, 'stdout': proc.stdout, 'data': fp32_run['data']}


@pytest.fixture(scope='session')
def exported(fp32_run, qat_run, tmp_path_factory):
    """FP32 and INT8 inference models with the argmax head."""
    base = tmp_path_factory.mktemp('infer')
    dirs = {'fp32': str(base / 'fp32'), 'int8': str(base / 'int8')}
    proc = run_cli('export.py', '--config', INSTANT, '--model_path',
                   os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                   '--save_dir', dirs['fp32'], '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli('slim/quant/qat_export.py', '--config', INSTANT, '--model_path',
                   os.path.join(qat_run['dir'], 'best_model', 'model.pdparams'),
                   '--save_dir', dirs['int8'], '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs['qat_export_stdout'] = proc.stdout
    dirs['data'] = fp32_run['data']
    return dirs
