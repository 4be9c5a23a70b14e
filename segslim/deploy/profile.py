"""Where an engine's time goes: oneDNN's own verbose log, summed per primitive kind, and
the remainder, which runs in Paddle's native CPU kernels (bilinear resize, arg_max, ...).

The engine runs in a child process that times it with logging off, then turns oneDNN's
verbose mode on (dnnl_set_verbose) for the same number of runs; oneDNN times each primitive
itself, so the log's cost stays out of the numbers."""
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Sequence, Set, Tuple

START = 'SEGSLIM-PROFILE-START'
END = 'SEGSLIM-PROFILE-END'
# A 2-D convolution's problem in oneDNN's verbose log, e.g.
# g16mb1_ic16oc96_ih128oh64kh3sh2dh0ph0_iw128ow64kw3sw2dw0pw0
CONV_PROBLEM = re.compile(r'^(?:g(\d+))?mb\d+_ic(\d+)oc(\d+)_ih\d+oh\d+kh(\d+)sh(\d+)dh\d+ph\d+'
                          r'_iw\d+ow\d+kw(\d+)sw(\d+)')
# (groups, in channels, out channels, kernel h, kernel w, stride h, stride w)
ConvShape = Tuple[int, int, int, int, int, int, int]


def onednn() -> Any:
    """Paddle's oneDNN library (for dnnl_set_verbose)."""
    import paddle
    return ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libdnnl.so.3'))


def parse_verbose(lines: Sequence[str]) -> Dict[str, float]:
    """{kind: total ms} of oneDNN `exec` lines; convolutions and matmuls are split by the
    data type they read (e.g. 'convolution int8', 'convolution f32')."""
    totals: Dict[str, float] = {}
    for line in lines:
        fields = line.strip().split(',')
        if len(fields) < 6 or not fields[0].endswith('_verbose') or fields[1] != 'exec':
            continue
        kind = fields[3]
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        if kind in ('convolution', 'matmul', 'inner_product', 'deconvolution'):
            memory = ' '.join(fields[4:])
            kind += ' int8' if ('src_u8' in memory or 'src_s8' in memory) else \
                ' bf16' if 'src_bf16' in memory else ' f32'
        totals[kind] = totals.get(kind, 0.0) + ms
    return totals


def profile_engine(model_dir: str, precision: str, threads: int, shape: Sequence[int],
                   runs: int = 10) -> Dict[str, Any]:
    """{'wall_ms', 'by_kind': {kind: ms}, 'native_ms'} per run of the model's engine."""
    env = {k: v for k, v in os.environ.items() if k not in ('ONEDNN_VERBOSE', 'DNNL_VERBOSE')}
    code = ('import sys, json; from segslim.deploy.profile import _child; '
            '_child(*json.loads(sys.argv[1]))')
    args = json.dumps([os.path.abspath(model_dir), precision, threads, list(shape), runs])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, '-c', code, args], capture_output=True, text=True,
                          env=env, cwd=root)
    lines = proc.stdout.splitlines()
    if END not in lines:
        raise RuntimeError('profiling {} failed: {}'.format(
            model_dir, (proc.stderr.strip().splitlines() or ['no output'])[-1]))
    window = lines[lines.index(START) + 1:lines.index(END)]
    wall_ms = float(lines[lines.index(END) + 1]) / runs
    by_kind = {k: v / runs for k, v in parse_verbose(window).items()}
    native = max(wall_ms - sum(by_kind.values()), 0.0)
    # on small models oneDNN's timing of its own primitives can add up to more than the
    # quiet wall time: shares are then taken of that sum
    return {'wall_ms': wall_ms, 'by_kind': by_kind, 'native_ms': native,
            'total_ms': max(wall_ms, sum(by_kind.values()) + native)}


def reference_int8_convs(lines: Sequence[str]) -> Set[ConvShape]:
    """The shapes of the INT8 convolutions oneDNN ran with its reference kernel (`ref:any`,
    plain C++ loops: tens of times slower than a JIT kernel), from verbose `exec` lines."""
    shapes = set()
    for line in lines:
        fields = line.strip().split(',')
        if len(fields) < 8 or fields[1] != 'exec' or fields[3] != 'convolution':
            continue
        if 'ref' not in fields[4].split(':') or not re.search(r'\bsrc_[us]8', line):
            continue
        match = CONV_PROBLEM.match(fields[-2])
        if match:
            g, ic, oc, kh, sh, kw, sw = (int(v or 1) for v in match.groups())
            shapes.add((g, ic, oc, kh, kw, sh, sw))
    return shapes


def verbose_lines(run: Callable[[], Any]) -> List[str]:
    """oneDNN's verbose lines while `run()` runs in this process (its C stdout captured at
    the file descriptor)."""
    dnnl = onednn()
    _flush_all()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        try:
            dnnl.dnnl_set_verbose(1)
            run()
        finally:
            level = os.environ.get('ONEDNN_VERBOSE') or os.environ.get('DNNL_VERBOSE') or '0'
            dnnl.dnnl_set_verbose(int(level) if level.isdigit() else 0)  # as it was
            _flush_all()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors='replace').splitlines()


def _flush_all() -> None:
    """oneDNN prints through C stdio, buffered apart from Python's: flush both so the
    markers fall between the right lines."""
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)


def _child(model_dir: str, precision: str, threads: int, shape: Sequence[int],
           runs: int) -> None:
    import time

    import numpy as np

    from segslim.deploy.paddle_engine import PaddlePredictor
    from segslim.options import EngineOptions
    pred = PaddlePredictor(model_dir, EngineOptions(precision=precision, cpu_threads=threads,
                                              input_shape=tuple(shape)))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    dnnl = onednn()
    for _ in range(3):
        pred.run(x)
    tic = time.perf_counter()
    for _ in range(runs):
        pred.run(x)
    wall = time.perf_counter() - tic
    _flush_all()
    print(START, flush=True)
    dnnl.dnnl_set_verbose(1)
    for _ in range(runs):
        pred.run(x)
    dnnl.dnnl_set_verbose(0)
    _flush_all()
    print(END)
    print(wall * 1000, flush=True)


def format_profile(name: str, prof: Dict[str, Any]) -> str:
    """A markdown table of ms per run by kind, largest first."""
    lines = [f'| {name} | ms per run | share |', '|---|---|---|']
    items = sorted(prof['by_kind'].items(), key=lambda kv: -kv[1])
    items.append(('Paddle native kernels (resize, arg_max, ...) and overhead',
                  prof['native_ms']))
    for kind, ms in items:
        lines.append('| {} | {:.2f} | {:.1%} |'.format(kind, ms, ms / prof['total_ms']))
    lines.append('| total (wall) | {:.2f} | |'.format(prof['wall_ms']))
    return '\n'.join(lines)
