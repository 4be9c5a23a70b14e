"""Where an engine's time goes: oneDNN's own verbose log, summed per primitive kind, and
the remainder, which runs in Paddle's native CPU kernels (bilinear resize, arg_max, ...).

The engine runs in a child process that times it with logging off, then turns oneDNN's
verbose mode on (dnnl_set_verbose) for the same number of runs; oneDNN times each primitive
itself, so the log's cost stays out of the numbers."""
import json
import os
import subprocess
import sys
from typing import Any, Dict, Sequence

from segslim.deploy.onednn import flush_all, onednn, parse_verbose

START = 'SEGSLIM-PROFILE-START'
END = 'SEGSLIM-PROFILE-END'


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
    flush_all()
    print(START, flush=True)
    dnnl.dnnl_set_verbose(1)
    for _ in range(runs):
        pred.run(x)
    dnnl.dnnl_set_verbose(0)
    flush_all()
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
