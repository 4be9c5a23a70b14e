"""oneDNN's verbose log (the library Paddle Inference runs on CPU): turning it on around a
call in this process, what each primitive ran and for how long, and which INT8 convolutions
fell back to oneDNN's reference kernel; and the copy of a quantized program whose square
matmul weights Paddle's oneDNN INT8 passes dequantize right (square_weights_by_rows)."""
import ctypes
import os
import re
import sys
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Sequence, Set, Tuple

from segslim.program import ConvShape, block_ops, read_program

# A 2-D convolution's problem in oneDNN's verbose log, e.g.
# g16mb1_ic16oc96_ih128oh64kh3sh2dh0ph0_iw128ow64kw3sw2dw0pw0
CONV_PROBLEM = re.compile(r'^(?:g(\d+))?mb\d+_ic(\d+)oc(\d+)_ih\d+oh\d+kh(\d+)sh(\d+)dh\d+ph\d+'
                          r'_iw\d+ow\d+kw(\d+)sw(\d+)')


def onednn() -> Any:
    """Paddle's oneDNN library (for dnnl_set_verbose)."""
    import paddle
    return ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libdnnl.so.3'))


def flush_all() -> None:
    """oneDNN prints through C stdio, buffered apart from Python's: flush both, so what each
    prints lands where it was printed."""
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)


def verbose_lines(run: Callable[[], Any]) -> List[str]:
    """oneDNN's verbose lines while `run()` runs in this process (its C stdout captured at
    the file descriptor)."""
    dnnl = onednn()
    flush_all()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        try:
            dnnl.dnnl_set_verbose(1)
            run()
        finally:
            level = os.environ.get('ONEDNN_VERBOSE') or os.environ.get('DNNL_VERBOSE') or '0'
            dnnl.dnnl_set_verbose(int(level) if level.isdigit() else 0)  # as it was
            flush_all()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors='replace').splitlines()


def exec_records(lines: Sequence[str]) -> Iterator[Tuple[str, str, str, str, float]]:
    """(primitive kind, implementation, the data type it reads: int8, bf16 or f32, problem,
    ms) of each `exec` line, in both of oneDNN's formats: `onednn_verbose,exec,cpu,...` with
    `src_u8` memory (Paddle 2.6) and `onednn_verbose,v1,primitive,exec,cpu,...` with `src:u8`
    (Paddle 3.2); a timestamp field after the marker is skipped too."""
    for line in lines:
        fields = line.strip().split(',')
        if not fields[0].endswith('_verbose') or 'exec' not in fields[1:5]:
            continue
        at = fields.index('exec', 1)
        if len(fields) < at + 5 or fields[at + 1] not in ('cpu', 'gpu'):
            continue
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        memory = ' '.join(fields[at + 3:])
        dtype = 'int8' if re.search(r'\bsrc[_:][us]8\b', memory) else \
            'bf16' if re.search(r'\bsrc[_:]bf16\b', memory) else 'f32'
        yield fields[at + 2], fields[at + 3], dtype, fields[-2], ms


def parse_verbose(lines: Sequence[str]) -> Dict[str, float]:
    """{kind: total ms} of oneDNN `exec` lines; convolutions and matmuls are split by the
    data type they read (e.g. 'convolution int8', 'convolution f32')."""
    totals: Dict[str, float] = {}
    for kind, _, dtype, _, ms in exec_records(lines):
        if kind in ('convolution', 'matmul', 'inner_product', 'deconvolution'):
            kind += ' ' + dtype
        totals[kind] = totals.get(kind, 0.0) + ms
    return totals


def reference_int8_convs(lines: Sequence[str]) -> Set[ConvShape]:
    """The shapes of the INT8 convolutions oneDNN ran with its reference kernel (`ref:any`,
    plain C++ loops: tens of times slower than a JIT kernel), from verbose `exec` lines."""
    shapes = set()
    for kind, impl, dtype, problem, _ in exec_records(lines):
        match = CONV_PROBLEM.match(problem)
        if kind == 'convolution' and dtype == 'int8' and 'ref' in impl.split(':') and match:
            g, ic, oc, kh, sh, kw, sw = (int(v or 1) for v in match.groups())
            shapes.add((g, ic, oc, kh, kw, sh, sw))
    return shapes


def square_weights_by_rows(model_file: str, params_file: str, out_prefix: str) -> int:
    """Writes out_prefix.pdmodel/.pdiparams: the program with each square INT8 matrix-product
    weight quantized per column (a Linear's per-output-channel scales, quant_axis 1) stored
    transposed, quantized per row, and read with trans_y flipped: the same products. Returns
    how many weights (none written when 0). Paddle's quant_dequant_mkldnn_pass dequantizes a
    weight whose number of scales equals its first dimension as if they were per row, so a
    square Linear's weights (SegFormer's query and output projections) were scaled along the
    wrong axis on every oneDNN INT8 run: SegFormer-B0's QAT export lost 2.2 points of mIoU
    (0.9083 against 0.9299 in Paddle's own executor) on the AVX2 EPYC."""
    import numpy as np

    from segslim._paddle import paddle, static_mode
    from segslim.logger import quiet_native_output
    desc = read_program(model_file)  # the cheap look first: most programs have none
    block0 = desc.block(0)
    shapes = [block0.find_var(op.input('X')[0].encode()) for op in block_ops(desc)
              if op.type() == 'dequantize_linear' and op.attr('quant_axis') == 1]
    if not any(v is not None and v.persistable() and len(v.shape()) == 2 and
               v.shape()[0] == v.shape()[1] for v in shapes):
        return 0
    changed = 0
    with static_mode():
        exe = paddle.static.Executor(paddle.CPUPlace())
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope), quiet_native_output():
            program, feeds, fetches = paddle.static.load_inference_model(
                os.path.dirname(model_file) or '.', exe,
                model_filename=os.path.basename(model_file),
                params_filename=os.path.basename(params_file))
            block = program.global_block()
            readers: Dict[str, List[Any]] = {}
            for op in block.ops:
                for name in op.input_arg_names:
                    readers.setdefault(name, []).append(op)
            for op in block.ops:
                weight = op.input('X')[0] if op.type == 'dequantize_linear' else None
                if weight is None or not block.var(weight).persistable or \
                        op.attr('quant_axis') != 1:
                    continue
                tensor = scope.find_var(weight).get_tensor()
                q = np.array(tensor)
                users = readers.get(op.output('Y')[0], [])
                if q.ndim != 2 or q.shape[0] != q.shape[1] or not users or any(
                        u.type != 'matmul_v2' or u.input('Y') != op.output('Y') for u in users):
                    continue
                tensor.set(np.ascontiguousarray(q.T), paddle.CPUPlace())
                op._set_attr('quant_axis', 0)
                for user in users:
                    user._set_attr('trans_y', not user.attr('trans_y'))
                changed += 1
            if changed:
                paddle.static.save_inference_model(
                    out_prefix, [block.var(name) for name in feeds], fetches, exe,
                    program=program)
    return changed
