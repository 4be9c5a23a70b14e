import contextlib
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile

import pytest
from filelock import FileLock

# The pytest workers share the machine's cores: each one's dygraph work runs on one thread
# (segslim's default is every core; OMP_NUM_THREADS, where set, wins).
os.environ.setdefault('OMP_NUM_THREADS', '1')
# No INT8 kind choice of the user's cache is read: the run's own folder is set by the
# kind_choice_cache fixture before the first test.
os.environ['SEGSLIM_CACHE_DIR'] = 'off'

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
INSTANT = os.path.join(ROOT, 'tests', 'configs', 'instant.yml')
# --to_onnx runs where paddle2onnx installs (it has no wheel for Python 3.13)
ONNX_EXPORT = importlib.util.find_spec('paddle2onnx') is not None
TO_ONNX = ['--to_onnx'] if ONNX_EXPORT else []
needs_onnx_export = pytest.mark.skipif(not ONNX_EXPORT, reason='paddle2onnx is not installed '
                                       '(no wheel for this Python): no ONNX export')


def run_cli(script, *args, cwd=None, timeout=600, env=None):
    """Runs a repo script in a process of its own; returns a CompletedProcess (text output).
    The process is forked from a server that has imported paddle and paddleseg once (seconds
    saved per run); an `env` that changes the interpreter (PYTHONPATH) gets a fresh one."""
    full_env = dict(os.environ, SEGSLIM_OFFLINE='1', PYTHONWARNINGS='ignore')
    full_env.pop('SEGSLIM_DEBUG', None)
    full_env.update(env or {})
    argv = [str(a) for a in args]
    if env and 'PYTHONPATH' in env:
        return subprocess.run([sys.executable, os.path.join(ROOT, script)] + argv,
                              cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                              env=full_env)
    with tempfile.TemporaryDirectory(prefix='run-cli-') as tmp:
        out, err = os.path.join(tmp, 'out'), os.path.join(tmp, 'err')
        child = _preloaded().Process(target=_run_script, args=(
            os.path.join(ROOT, script), argv, str(cwd or ROOT), full_env, out, err))
        child.start()
        child.join(timeout)
        if child.is_alive():
            _report_hang(child.pid, err)
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired([script, *argv], timeout)
        with open(out, errors='replace') as f_out, open(err, errors='replace') as f_err:
            return subprocess.CompletedProcess([script, *argv], child.exitcode, f_out.read(),
                                               f_err.read())


_CONTEXT = []


def _preloaded():
    """The multiprocessing context whose server process has imported paddle and paddleseg
    (through segslim, which binds zlib first) and nothing has run in yet."""
    if not _CONTEXT:
        import multiprocessing
        ctx = multiprocessing.get_context('forkserver')
        ctx.set_forkserver_preload(['segslim._paddle', 'paddleseg', 'segslim.cli.commands',
                                    'conftest'])
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _descendants(pid):
    children = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def _report_hang(pid, err):
    """A script that did not finish: every thread's stack of it and of its children (loader
    workers) into its stderr, whose tail goes to this test's stderr; the children killed."""
    import signal
    import time
    tree = [pid] + _descendants(pid)
    for p in tree:  # one after another: they write to the same file
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGUSR1)
        time.sleep(0.5)
    with open(err, errors='replace') as f:
        sys.stderr.write('stderr of the script that did not finish, with its threads\' stacks '
                         f'(processes {tree}):\n' + f.read()[-20000:])
    for p in tree[1:]:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def _run_script(path, argv, cwd, env, out, err):
    """In the forked process: the script as `python path argv...` would run it, its output
    in the files `out` and `err`."""
    import runpy
    import warnings
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    warnings.simplefilter('ignore')  # PYTHONWARNINGS=ignore of a fresh process
    for fd, name in ((1, out), (2, err)):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # for run_cli's timeout report
    sys.argv = [path] + argv
    code = 0
    try:
        runpy.run_path(path, run_name='__main__')
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


SCRIPTS = {  # the scripts' entry points, for in-process runs
    'train.py': 'train', 'val.py': 'val', 'export.py': 'export',
    'slim/quant/qat_train.py': 'qat_train', 'slim/quant/qat_val.py': 'qat_val',
    'slim/quant/qat_export.py': 'qat_export', 'slim/quant/ptq.py': 'ptq',
    'slim/quant/analysis.py': 'analysis', 'slim/quant/auto_quant.py': 'auto_quant',
    'deploy/python/infer.py': 'infer',
    'deploy/python/benchmark.py': 'benchmark', 'tools/make_demo_dataset.py': 'make_demo_dataset',
    'tools/compare_methods.py': 'compare_methods',
}


def run_command(script, *args, env=None):
    """Runs a repo script's command in this process (for paths that need no process of
    their own: argument and setup errors); returns a CompletedProcess like run_cli's."""
    from segslim.cli import commands, tools
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
            getattr(tools if script.startswith('tools/') else commands, SCRIPTS[script])(argv)
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


def table_rows(text):
    """The cells of every markdown table row in `text` (separator rows left out), stripped:
    what a reader sees, whatever the column padding."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('|') and line.endswith('|'):
            cells = [c.strip() for c in line[1:-1].split('|')]
            if not all(set(c) <= set(':-') for c in cells):
                rows.append(cells)
    return rows


def has_row(text, *cells):
    """Whether a markdown table row in `text` starts with these cells."""
    return any(row[:len(cells)] == [str(c) for c in cells] for row in table_rows(text))


def make_row(model_dir, precision, s, backend='paddle', speedup=1.0, miou=None,
             class_iou=None, int8_convs=0, convs=4, note=None):
    """A typed benchmark row for tests that need one without running an engine."""
    from segslim.deploy.results import Accuracy, BenchRow, OpSummary, Precision
    ops = OpSummary(int8_ops=int8_convs, quantizable_ops=convs, conv_ops=convs,
                    int8_conv_ops=int8_convs)
    accuracy = Accuracy(miou=miou, class_iou=class_iou or [miou, miou], acc=miou,
                        pixel_agreement=1.0) if miou is not None else None
    return BenchRow(model_dir=model_dir, backend=backend, precision=Precision(precision),
                    s_per_img=s, p90_s=s, params_mb=1.0, ops=ops, accuracy=accuracy,
                    speedup=speedup, precision_note=note)


def make_report(rows, threads=2, vnni=True):
    from segslim.deploy.bench_report import BenchReport
    return BenchReport(isa='AVX-512 VNNI' if vnni else 'AVX2', cpu='test CPU', vnni=vnni,
                       threads=threads, device='cpu', input_shape=[1, 3, 64, 64], warmup=1,
                       repeats=5, rows=list(rows))


def data_opts(root):
    return [f'{key}.dataset_root={root}' for key in ('train_dataset', 'val_dataset')]


@pytest.fixture(scope='session')
def instant_data(tmp_path_factory):
    from segslim.data.demo import make_demo_dataset
    root = str(tmp_path_factory.mktemp('data') / 'instant')
    make_demo_dataset(root, num_train=8, num_val=4, num_test=2, size=64, seed=3)
    return root


@pytest.fixture(scope='session', autouse=True)
def kind_choice_cache(tmp_path_factory):
    """The engines' INT8 choice per kind of layer is kept, as on a user's machine, but only
    for this test run: in one folder that the run's pytest-xdist workers share (beside
    once_per_run's values), so a model that tests in several workers load at the same shape
    is timed once (the shared `exported` model was timed in two workers with a folder per
    worker), and no choice of an earlier run or another checkout is read. The cache's own
    tests set their folder."""
    os.environ['SEGSLIM_CACHE_DIR'] = str(run_folder(tmp_path_factory) / 'segslim-cache')


def run_folder(tmp_path_factory):
    """The temp folder of this test run that its pytest-xdist workers share (each worker's
    own is a folder in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def once_per_run(tmp_path_factory, name, make):
    """A session fixture's value made once per test run rather than once per pytest-xdist
    worker: the first worker to ask makes it (a JSON-able value, its files under that
    worker's temp folder, which lasts the run) while the others wait, then read it."""
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return make()
    shared = run_folder(tmp_path_factory) / f'{name}.json'
    with FileLock(f'{shared}.lock'):
        if shared.is_file():
            return json.loads(shared.read_text())
        value = make()
        shared.write_text(json.dumps(value))
        return value


@pytest.fixture(scope='session')
def fp32_run(instant_data, tmp_path_factory):
    """A 20-iteration FP32 run of train.py with evaluation."""
    return once_per_run(tmp_path_factory, 'fp32_run',
                        lambda: _fp32_run(instant_data, tmp_path_factory))


def _fp32_run(instant_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('fp32'))
    proc = run_cli('train.py', '--config', INSTANT, '--do_eval', '--save_interval', 10, '--seed', 0,
                   '--use_vdl',
                   '--log_iters', 5, '--save_dir', out, '--opts', *data_opts(instant_data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {'dir': out, 'stdout': proc.stdout, 'data': instant_data}


@pytest.fixture(scope='session')
def qat_run(fp32_run, tmp_path_factory):
    """A 10-iteration qat_train.py run from the FP32 best model."""
    return once_per_run(tmp_path_factory, 'qat_run', lambda: _qat_run(fp32_run, tmp_path_factory))


def _qat_run(fp32_run, tmp_path_factory):
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
    return once_per_run(tmp_path_factory, 'exported',
                        lambda: _exported(fp32_run, qat_run, tmp_path_factory))


def _exported(fp32_run, qat_run, tmp_path_factory):
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


def tree_digest(folder):
    """{relative path: sha1} of every file below folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out
