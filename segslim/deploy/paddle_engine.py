"""Paddle Inference: oneDNN on CPU (FP32, bf16, INT8), TensorRT on GPU. An INT8 program
never crashes and never silently runs FP32: a failing oneDNN op set is narrowed, an op type
oneDNN rejects runs in Paddle's own kernels, and every change is reported."""
import os
import re
import shutil
import tempfile
import weakref
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
from paddle import inference as pi

from segslim._paddle import paddle
from segslim.compat import pass_name
from segslim.deploy.engine import EngineBase
from segslim.deploy.int8_kinds import conv_kind
from segslim.deploy.onednn import reference_int8_convs, square_weights_by_rows, verbose_lines
from segslim.deploy.results import OpSummary, PassChange, Precision
from segslim.errors import UserError
from segslim.logger import logger, quiet_native_output
from segslim.options import EngineOptions
from segslim.program import (
    CONV_TYPES,
    DEFAULT_INT8_OPS,
    MATMUL_TYPES,
    ConvShape,
    block_ops,
    input_quantized_layers,
    program_input_names,
    read_program,
    run_convs_in_fp32,
    run_layers_in_float,
)

# INT8 op sets tried in order until the engine runs.
INT8_FALLBACK_OPS = (DEFAULT_INT8_OPS, ('conv2d', 'fused_conv2d'))
# Without this pass residual convs (conv + elementwise_add) are left in FP32.
INT8_DELETE_PASSES = ('conv_elementwise_add_mkldnn_fuse_pass',)
# Passes Paddle 2.6 ships but leaves out of its oneDNN CPU list: they move work from Paddle's
# own CPU kernels into oneDNN with the same outputs, so FP32, bf16 and INT8 rows all get them
# (bilinear/nearest resize).
ONEDNN_EXTRA_PASSES = ('interpolate_mkldnn_pass',)


def op_summary(model_file: str) -> OpSummary:
    """What runs INT8 in an optimized (oneDNN) program, counted over the quantizable ops:
    convolutions and matrix products (matmul, matmul_v2, fc, mul: most of a transformer's
    compute)."""
    desc = read_program(model_file)
    ops = []
    for op in block_ops(desc):
        dtype = op.attr('mkldnn_data_type') if op.has_attr('mkldnn_data_type') else ''
        outs = [op.output(n)[0] for n in op.output_names() if op.output(n)]
        ops.append((op.type(), dtype == 'int8', outs[0] if outs else op.type()))
    return OpSummary.count(ops, CONV_TYPES, MATMUL_TYPES)



# Without an explicit range TensorRT accepts inputs up to this side (or the timing input's,
# when larger); a larger image is a one-line error that names the flags to widen it.
TRT_MAX_SIDE = 2048
TRT_MIN_SIDE = 32


def check_engine_options(opts: EngineOptions) -> None:
    """Refuses precision/device combinations the engine would silently run as something
    else (it only halves precision inside TensorRT, and bf16 exists only in oneDNN)."""
    if opts.precision == 'bf16' and (opts.device != 'cpu' or opts.use_trt):
        raise UserError('--precision bf16 runs on CPU with oneDNN only; drop --use_trt / use '
                        '--device cpu, or pick fp32/fp16/int8 for TensorRT')
    if opts.precision == 'bf16' and not opts.enable_mkldnn:
        raise UserError('--precision bf16 needs oneDNN; drop --enable_mkldnn False')
    if opts.precision == 'fp16' and not (opts.device == 'gpu' and opts.use_trt):
        raise UserError('--precision fp16 runs only inside TensorRT; add --device gpu '
                        '--use_trt True, or use fp32 (or bf16 on CPU)')


def layer_kinds(model_file: str) -> Dict[str, str]:
    """{output name: int8_kinds kind} of the layers of a program that oneDNN runs in INT8."""
    return {out: 'matmul' if shape is None else conv_kind(
        shape[0], shape[1] // shape[0], shape[2] // shape[0], shape[3:5])
        for out, shape in input_quantized_layers(model_file).items()}


def describe_conv(shape: ConvShape) -> str:
    """'16->96 channels, 16 groups, 3x3, stride 2' for a conv shape."""
    groups, ic, oc, kh, kw, sh, sw = shape
    return '{}->{} channels{}, {}x{}{}'.format(
        ic, oc, f', {groups} groups' if groups > 1 else '', kh, kw,
        '' if (sh, sw) == (1, 1) else f', stride {sh}' if sh == sw else f', stride {sh}x{sw}')


class PaddlePredictor(EngineBase):
    """One Paddle Inference predictor for an exported model folder.

    `precision` says what the engine runs; a quantized model on a path that simulates its
    fake-quant ops in FP32 (no oneDNN, or GPU without TensorRT) runs FP32 with
    NO_INT8_NOTE. `fallback` says what was changed to make the engine run (None if
    nothing); `ops` holds the op summary of the optimized program on CPU.
    """
    backend = 'paddle'
    package = 'paddlepaddle'

    def __init__(self, model_dir: str, opts: EngineOptions,
                 delete_passes: Sequence[str] = INT8_DELETE_PASSES,
                 extra_passes: Sequence[str] = ONEDNN_EXTRA_PASSES):
        check_engine_options(opts)
        # as this paddle spells them: what the config gets and the report names
        self.delete_passes = tuple(pass_name(n, paddle.__version__) for n in delete_passes)
        self.extra_passes = tuple(pass_name(n, paddle.__version__) for n in extra_passes)
        super().__init__(model_dir, opts)
        self.trt = opts.device == 'gpu' and opts.use_trt
        self.input_name = (program_input_names(self.deploy['model']) or ['x'])[0]
        self.shape_file = None
        if self.trt and opts.enable_auto_tune:
            if self.fixed_shape():
                raise UserError('--enable_auto_tune: {} was exported with the fixed input shape '
                                '{}, so there is no shape range to tune; drop the flag'.format(
                                    model_dir, self.deploy['input_shape']))
            self.shape_file = opts.trt_shape_file
            if not self.shape_file:  # PaddleSeg tunes into a temporary file and deletes it
                tmp = tempfile.mkdtemp(prefix='segslim-trt-')
                weakref.finalize(self, shutil.rmtree, tmp, True)
                self.shape_file = os.path.join(tmp, 'shape_range_info.pbtxt')
        probe = self.probe_shape()
        self.trt_max = (max(TRT_MAX_SIDE, probe[2]), max(TRT_MAX_SIDE, probe[3]))
        self._set_precision()
        self.model_file, self.params_file = self.deploy['model'], self.deploy['params']
        onednn_int8 = self.quantized and self.precision == 'int8' and \
            self.opts.device == 'cpu' and self.opts.enable_mkldnn
        if onednn_int8:
            self._square_weights_by_rows()
        self._create()
        if onednn_int8:
            self._avoid_reference_convs()
            self._choose_kinds()
        if self.quantized and self.precision == 'int8' and self.opts.device == 'cpu' and \
                self.ops.quantizable_ops and not self.ops.int8_ops:
            self.ran_no_int8()

    @property
    def passes(self) -> PassChange:
        """What this engine changes in Paddle's pass list, for the report: passes only apply
        on CPU with oneDNN."""
        if self.opts.device != 'cpu' or not self.opts.enable_mkldnn:
            return PassChange()
        return PassChange(appended=self.extra_passes,
                          deleted=self.delete_passes if self.quantized else ())

    def _set_precision(self) -> None:
        opts = self.opts
        if not self.quantized:
            self.precision = Precision(opts.precision)
        elif (opts.device == 'cpu' and opts.enable_mkldnn) or self.trt:
            self.precision = Precision.INT8
        else:
            self.ran_no_int8()

    def _config(self, int8_ops: Sequence[str], cache: Optional[str],
                native: Sequence[str] = (), model_file: Optional[str] = None,
                float_kinds: Optional[FrozenSet[str]] = None) -> Any:
        """The engine config (of `model_file`, else the engine's program); `native` op types
        run in Paddle's own CPU kernels instead of oneDNN (ops oneDNN rejected for this
        model); with `float_kinds` (else the chosen ones) holding `matmul`, no matrix-product
        op type runs INT8: oneDNN quantizes every op of an INT8 type whose input has a scale,
        and a Linear whose input another layer still reads through a quantize/dequantize
        pair keeps one."""
        opts = self.opts
        config = pi.Config(model_file or self.model_file, self.params_file)
        if not opts.print_detail:
            config.disable_glog_info()
        if opts.device == 'gpu':
            config.enable_use_gpu(opts.gpu_mem_mb, opts.gpu_id)
            if self.trt:
                self._enable_trt(config)
            return config
        if opts.device == 'xpu':
            config.enable_xpu()
            return config
        if opts.device in ('npu', 'mlu'):
            config.enable_custom_device(opts.device)
            return config
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(opts.cpu_threads)
        if not opts.enable_mkldnn:
            config.disable_mkldnn()  # a fresh Config has oneDNN on in Paddle 2.6
            return config
        config.enable_mkldnn()
        config.set_mkldnn_cache_capacity(10)
        if native:
            config.set_mkldnn_op(set(self.op_types) - set(native))
        if opts.precision == 'bf16':
            config.enable_mkldnn_bfloat16()
        if self.quantized:
            floated = self.kinds.float_kinds if float_kinds is None else float_kinds
            types = set(int8_ops) - (set(MATMUL_TYPES) if 'matmul' in floated else set())
            config.enable_mkldnn_int8(types or set(int8_ops))  # empty would mean every type
            for name in self.delete_passes:
                config.delete_pass(name)
        for name in self.extra_passes:
            config.pass_builder().append_pass(name)
        if cache:
            config.set_optim_cache_dir(cache)
            config.enable_save_optim_model(True)
        return config

    def _square_weights_by_rows(self) -> None:
        """Runs a copy of the model whose square INT8 matmul weights are stored per row
        (onednn.square_weights_by_rows: Paddle's oneDNN INT8 passes scale them along the
        wrong axis otherwise), when it has any."""
        tmp = tempfile.mkdtemp(prefix='segslim-square-')
        weakref.finalize(self, shutil.rmtree, tmp, True)
        prefix = os.path.join(tmp, 'model')
        try:
            changed = square_weights_by_rows(self.model_file, self.params_file, prefix)
        except Exception as e:  # paddle raises generic errors; the files load as they are
            logger.warning('%s: could not store its square INT8 weights per row (%s); they '
                           'run as Paddle dequantizes them', self.model_dir, str(e)[:160])
            return
        if changed:
            self.model_file, self.params_file = prefix + '.pdmodel', prefix + '.pdiparams'
            self.program_changes['square_weights_by_rows'] = changed

    def _avoid_reference_convs(self) -> None:
        """Runs in FP32 the INT8 convs that oneDNN has only its reference kernel for on this
        CPU (seen in its verbose log of a probe run), from a copy of the program without their
        input quantization. On AVX2 without VNNI, BiSeNetV2's grouped convs with a channel
        multiplier (16 -> 96 channels in 16 groups) took 202 of 248 ms that way; in FP32
        they take 2."""
        probe = np.zeros(self.probe_shape(), np.float32)
        try:
            lines = verbose_lines(lambda: self.run(probe))
        except OSError:  # a paddle build without its oneDNN library where we look for it
            return
        shapes = reference_int8_convs(lines)
        if not shapes:
            return
        tmp = tempfile.mkdtemp(prefix='segslim-fp32-convs-')
        weakref.finalize(self, shutil.rmtree, tmp, True)
        model_file = os.path.join(tmp, os.path.basename(self.model_file))
        changed = run_convs_in_fp32(self.model_file, model_file, shapes)
        if not changed:
            return
        self.model_file = model_file
        self._create()  # keeps `fallback` unless the engine needed another change
        self.fp32_convs = self.program_changes['fp32_convs'] = changed
        note = '{} INT8 convs run FP32: this CPU has only oneDNN\'s reference INT8 kernel for ' \
               'their shapes ({})'.format(len(changed), '; '.join(map(describe_conv,
                                                                      sorted(shapes))))
        self.fallback = '; '.join(n for n in (self.fallback, note) if n)

    def _choose_kinds(self) -> None:
        """Leaves in float the kinds of layer INT8 does not speed up here (int8_kinds): each
        variant is a copy of the program without the input quantization of those layers,
        built with the op sets the engine runs and timed at the probe shape."""
        layers = layer_kinds(self.model_file)
        tmp = tempfile.mkdtemp(prefix='segslim-float-kinds-')
        weakref.finalize(self, shutil.rmtree, tmp, True)

        def variant(kinds: FrozenSet[str]) -> str:
            if not kinds:
                return self.model_file
            path = os.path.join(tmp, '+'.join(sorted(kinds)), os.path.basename(self.model_file))
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                run_layers_in_float(self.model_file, path,
                                    [out for out, kind in layers.items() if kind in kinds])
            return path

        def build(kinds: FrozenSet[str], images: np.ndarray) -> Callable[[], None]:
            with quiet_native_output(not self.opts.print_detail):
                predictor = pi.create_predictor(self._config(
                    self.int8_ops, None, self.native, variant(kinds), kinds))
            handle = predictor.get_input_handle(predictor.get_input_names()[0])

            def run() -> None:
                handle.reshape(list(images.shape))
                handle.copy_from_cpu(images)
                predictor.run()
            run()
            return run
        chosen = self.choose_kinds(set(layers.values()), build)
        if chosen.float_kinds:
            self.model_file = variant(chosen.float_kinds)
            kept = self.fallback  # the same op sets build again: nothing new to say
            self._create()
            self.fallback = kept

    def _enable_trt(self, config: Any) -> None:
        """TensorRT: dynamic shapes; INT8 QAT models carry their scales (no calibration)."""
        opts = self.opts
        precision = {'fp32': pi.PrecisionType.Float32, 'fp16': pi.PrecisionType.Half,
                     'int8': pi.PrecisionType.Int8}[self.precision]
        config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=1,
                                      min_subgraph_size=opts.min_subgraph_size,
                                      precision_mode=precision, use_static=False,
                                      use_calib_mode=False)
        if self.shape_file:
            config.enable_tuned_tensorrt_dynamic_shape(self.shape_file, True)
        else:
            n, c, h, w = self.probe_shape()
            name, n = self.input_name, max(n, 1)
            config.set_trt_dynamic_shape_info({name: [1, c, TRT_MIN_SIDE, TRT_MIN_SIDE]},
                                              {name: [n, c, self.trt_max[0], self.trt_max[1]]},
                                              {name: [n, c, h, w]})

    def _collect_shapes(self) -> None:
        """--enable_auto_tune: a plain GPU run records the input/intermediate shape ranges
        that TensorRT then uses (Paddle's tuned dynamic shape)."""
        config = pi.Config(self.deploy['model'], self.deploy['params'])
        config.enable_use_gpu(self.opts.gpu_mem_mb, self.opts.gpu_id)
        if not self.opts.print_detail:
            config.disable_glog_info()
        config.collect_shape_range_info(self.shape_file)
        self._use(pi.create_predictor(config))
        for shape in ([1, 3, 256, 256], self.probe_shape()):
            self.run(np.zeros(shape, np.float32))

    def _hint(self) -> str:
        if self.trt:
            return ('check the TensorRT install and the input shapes (--enable_auto_tune True '
                    'collects them), or drop --use_trt')
        if self.opts.device == 'cpu' and self.opts.enable_mkldnn:
            return 'try --enable_mkldnn False, or re-export the model'
        return 're-export the model with this paddle version'

    def _create(self) -> None:
        if self.shape_file:
            self._collect_shapes()
        cpu_int8 = self.opts.device == 'cpu' and self.opts.enable_mkldnn and self.quantized
        ladders: Tuple[Tuple[str, ...], ...] = ((),)  # () : no INT8 op set to choose
        if cpu_int8:  # the export's own op set first (deploy.yaml int8_ops), then ours
            own = tuple(self.deploy.get('int8_ops') or ())
            ladders = ((own,) if own and own not in INT8_FALLBACK_OPS else ()) + \
                INT8_FALLBACK_OPS
        errors: List[str] = []
        native: List[str] = []  # op types oneDNN rejected: they run in Paddle's kernels
        # the INT8 op set and the native op types the engine runs with, once it does
        self.int8_ops: Sequence[str] = ()
        self.native: Sequence[str] = ()
        level = 0
        while level < len(ladders):
            ops = ladders[level]
            cache = tempfile.mkdtemp(prefix='segslim-opt-') if self.opts.device == 'cpu' \
                else None
            try:
                with quiet_native_output(not self.opts.print_detail):
                    self._use(pi.create_predictor(self._config(ops, cache, native)))
                    self.run(np.zeros(self.probe_shape(), np.float32))
                changes = []
                if level:
                    changes.append('oneDNN INT8 ops narrowed to {}'.format('/'.join(ops)))
                if native:
                    changes.append('{} run in Paddle\'s own kernels, not oneDNN'.format(
                        '/'.join(native)))
                if changes:
                    self.fallback = '{} after: {}'.format('; '.join(changes), errors[-1])
                self.int8_ops, self.native = ops, tuple(native)
                optimized = os.path.join(cache, '_optimized.pdmodel') if cache else None
                if optimized and os.path.exists(optimized):
                    self.ops = op_summary(optimized)
                return
            except UserError:
                raise
            except Exception as e:  # the engine reports failures as generic errors
                text = str(e).strip()
                errors.append(text.splitlines()[-1][:160] if text else type(e).__name__)
                failed = re.search(r'operator < (\w+) > error', text)
                if self.opts.device == 'cpu' and self.opts.enable_mkldnn and failed and \
                        failed.group(1) not in native and len(native) < 4:
                    native.append(failed.group(1))  # same op set, that op out of oneDNN
                else:
                    level += 1
            finally:
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)
        raise UserError('Paddle Inference cannot run {} ({}); {}'.format(
            self.model_dir, '; '.join(errors), self._hint()))

    def _use(self, predictor: Any) -> None:
        self.predictor = predictor
        self._input = predictor.get_input_handle(predictor.get_input_names()[0])
        self._output = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(self, images: np.ndarray) -> np.ndarray:
        """Runs a N,C,H,W float32 batch; returns the first output."""
        if self.trt and not self.shape_file and (images.shape[2] > self.trt_max[0] or
                                                 images.shape[3] > self.trt_max[1]):
            raise UserError('input {}x{} is beyond the TensorRT shape range (up to {}x{}); '
                            'pass --input_shape with the largest size or --enable_auto_tune '
                            'True'.format(images.shape[2], images.shape[3], *self.trt_max))
        self._input.reshape(list(images.shape))
        self._input.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        return self._output.copy_to_cpu()
