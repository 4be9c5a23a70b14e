"""Paddle Inference predictors for exported models, with an INT8 path that never crashes
and never silently runs FP32: a failing oneDNN op set is narrowed and the change reported."""
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from segslim import builder
from segslim.data.datasets import read_image
from segslim.errors import UserError
from segslim.export import read_program
from segslim.logger import quiet_native_output

from paddle import inference as pi

# oneDNN INT8 op set. Paddle's default set crashes on concat ("could not create a primitive
# descriptor for a concat primitive") for BiSeNetV2, PP-LiteSeg and DeepLabV3P once the
# program is fused. Adding pool2d ran as fast here (BiSeNetV2 33.2 vs 33.2 ms, DeepLabV3P-R18
# 155.1 vs 155.9 ms at 512x512) but lowered agreement with the QAT model (99.947 % vs
# 99.978 % of demo val pixels), so pooling stays FP32.
INT8_OPS = ('conv2d', 'depthwise_conv2d', 'fused_conv2d')
# Op sets tried in order until the engine runs; 'default' is Paddle's own set.
INT8_FALLBACK_OPS = (INT8_OPS, ('conv2d', 'fused_conv2d'))
# Without this pass residual convs (conv + elementwise_add) are left in FP32.
INT8_DELETE_PASSES = ('conv_elementwise_add_mkldnn_fuse_pass',)
CONV_TYPES = ('conv2d', 'depthwise_conv2d', 'fused_conv2d', 'conv2d_transpose')
MATMUL_TYPES = ('matmul', 'matmul_v2', 'fused_matmul', 'fc', 'mul')
QUANT_OP_TYPES = ('quantize_linear', 'dequantize_linear', 'fake_quantize_dequantize_abs_max',
                  'fake_channel_wise_quantize_dequantize_abs_max',
                  'fake_quantize_dequantize_moving_average_abs_max')


@dataclass
class EngineOptions:
    """How to run a model: device, precision and the engine's knobs."""
    device: str = 'cpu'
    backend: str = 'paddle'          # paddle (Paddle Inference) | openvino (CPU)
    precision: str = 'fp32'          # fp32 | bf16 (CPU) | int8 | fp16 (GPU TensorRT)
    cpu_threads: int = 2
    enable_mkldnn: bool = True
    use_trt: bool = False
    min_subgraph_size: int = 3
    enable_auto_tune: bool = False
    gpu_mem_mb: int = 500
    gpu_id: int = 0
    trt_shape_file: Optional[str] = None
    input_shape: Sequence[int] = (1, 3, 512, 512)
    print_detail: bool = False       # Paddle Inference's own glog output
    delete_passes: Sequence[str] = field(default_factory=lambda: list(INT8_DELETE_PASSES))


def read_deploy(model_dir: str) -> Dict[str, Any]:
    """The `Deploy` section of <model_dir>/deploy.yaml with absolute model/params paths."""
    path = os.path.join(model_dir, 'deploy.yaml') if os.path.isdir(model_dir) else model_dir
    if not os.path.isfile(path):
        raise UserError('{} has no deploy.yaml; pass a folder written by export.py or '
                        'qat_export.py'.format(model_dir))
    try:
        with open(path) as f:
            deploy = (yaml.safe_load(f) or {}).get('Deploy')
    except (yaml.YAMLError, AttributeError) as e:
        raise UserError('{} is not a valid deploy.yaml ({}); re-export the model'.format(
            path, type(e).__name__))
    if not isinstance(deploy, dict) or 'model' not in deploy or 'params' not in deploy:
        raise UserError('{} lacks Deploy.model/Deploy.params; re-export the model'.format(path))
    base = os.path.dirname(os.path.abspath(path))
    deploy = dict(deploy)
    for key in ('model', 'params'):
        deploy[key] = os.path.join(base, deploy[key])
        if not os.path.isfile(deploy[key]):
            raise UserError('{} names {} which does not exist; re-export the model'.format(
                path, deploy[key]))
    deploy.setdefault('transforms', [{'type': 'Normalize'}])
    deploy.setdefault('output_op', 'argmax')
    deploy['dir'] = base
    return deploy


def program_op_types(model_file: str) -> List[str]:
    """Op types of block 0 of a saved program (a one-line error if it is not one)."""
    desc = read_program(model_file)  # keep it alive: the block points into it
    block = desc.block(0)
    return [block.op(i).type() for i in range(block.op_size())]


def summarize_ops(ops: Iterable[Tuple[str, bool, str]], conv_kinds: Sequence[str],
                  matmul_kinds: Sequence[str]) -> Dict[str, Any]:
    """The op summary every backend reports, from (kind, runs INT8, name) of the engine's
    ops: {'int8_ops', 'quantizable_ops', 'fp32_ops': [names], 'by_type': {kind: [int8,
    total]}, 'conv_ops', 'int8_conv_ops', 'matmul_ops', 'int8_matmul_ops'}; only conv and
    matmul kinds count."""
    by_type: Dict[str, List[int]] = {}
    fp32 = []
    for kind, int8, name in ops:
        if kind not in tuple(conv_kinds) + tuple(matmul_kinds):
            continue
        counts = by_type.setdefault(kind, [0, 0])
        counts[1] += 1
        if int8:
            counts[0] += 1
        else:
            fp32.append(name)

    def total(kinds, idx):
        return sum(by_type[k][idx] for k in kinds if k in by_type)
    return {'int8_ops': total(by_type, 0), 'quantizable_ops': total(by_type, 1),
            'fp32_ops': fp32, 'by_type': by_type,
            'conv_ops': total(conv_kinds, 1), 'int8_conv_ops': total(conv_kinds, 0),
            'matmul_ops': total(matmul_kinds, 1), 'int8_matmul_ops': total(matmul_kinds, 0)}


def op_summary(model_file: str) -> Dict[str, Any]:
    """What runs INT8 in an optimized (oneDNN) program, counted over the quantizable ops:
    convolutions and matrix products (matmul, matmul_v2, fc, mul: most of a transformer's
    compute); see summarize_ops."""
    desc = read_program(model_file)  # keep it alive: the block points into it
    block = desc.block(0)
    ops = []
    for i in range(block.op_size()):
        op = block.op(i)
        dtype = op.attr('mkldnn_data_type') if op.has_attr('mkldnn_data_type') else ''
        outs = [op.output(n)[0] for n in op.output_names() if op.output(n)]
        ops.append((op.type(), dtype == 'int8', outs[0] if outs else op.type()))
    return summarize_ops(ops, CONV_TYPES, MATMUL_TYPES)


class Preprocessor:
    """The deploy.yaml transforms applied to an image file, as in deployment."""

    def __init__(self, transforms: List[Dict[str, Any]]):
        from paddleseg.transforms import Compose
        self.compose = Compose(builder.build_transforms(transforms, 'Deploy.transforms'))

    def __call__(self, path: str):
        data = self.compose({'img': read_image(path), 'trans_info': [], 'gt_fields': []})
        return data['img'], data['trans_info']


def restore_size(labels: np.ndarray, trans_info: list) -> np.ndarray:
    """Undoes the transforms' resize/padding records on a H,W label map with paddleseg's
    reverse_transform (nearest for labels): the one restore rule for engine outputs and,
    in pixel agreement, for the dygraph model's."""
    from segslim._paddle import paddle
    from paddleseg.core.infer import reverse_transform
    if not trans_info:
        return labels
    out = reverse_transform(paddle.to_tensor(labels[np.newaxis, np.newaxis].astype(np.int32)),
                            trans_info, mode='nearest')
    return out.numpy()[0, 0].astype(labels.dtype)


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


def program_input_names(model_file: str) -> List[str]:
    """Names the program's feed ops fill, in order."""
    desc = read_program(model_file)  # keep it alive: the block points into it
    block = desc.block(0)
    feeds = [(block.op(i).attr('col'), block.op(i).output('Out')[0])
             for i in range(block.op_size()) if block.op(i).type() == 'feed']
    return [name for _, name in sorted(feeds)]


# What a quantized model's row says when the engine ran none of it in INT8.
NO_INT8 = 'fp32 (QAT model, no INT8 kernels)'


class EngineBase:
    """What every backend's predictor offers: `deploy` (read_deploy), `model_dir`, `opts`,
    `quantized`, `precision` (what the engine runs), `fallback` (what was changed to make it
    run, or None), `engine` (op summary: what runs INT8) and run() on a N,C,H,W batch."""
    backend = ''
    precision: str

    def __init__(self, model_dir: str, opts: EngineOptions):
        self.deploy = read_deploy(model_dir)
        self.opts = opts
        self.model_dir = model_dir
        self.op_types = program_op_types(self.deploy['model'])
        self.quantized = any(t in QUANT_OP_TYPES for t in self.op_types)
        self.fallback: Optional[str] = None
        self.engine: Dict[str, Any] = {}
        if opts.precision == 'int8' and not self.quantized:
            raise UserError('{} holds no quantization scales, so INT8 would silently run FP32; '
                            'export it with slim/quant/qat_export.py or ptq.py'.format(model_dir))

    def run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _probe_shape(self) -> List[int]:
        """The exported fixed input shape, else opts.input_shape: what a first run uses."""
        shape = list(self.deploy.get('input_shape') or [])
        if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape):
            return shape
        return list(self.opts.input_shape)

    def to_labels(self, out: np.ndarray) -> np.ndarray:
        """Class ids N,H,W of a run() output, whatever the exported head: argmax N,H,W
        (PaddleSeg's contract) or N,1,H,W (older exports), softmax or logits N,C,H,W. Read
        from the output itself: upstream exports do not always name their head."""
        if np.issubdtype(out.dtype, np.floating) and out.ndim == 4 and out.shape[1] > 1:
            return out.argmax(axis=1).astype(np.int64)
        return out.reshape(out.shape[0], out.shape[-2], out.shape[-1]).astype(np.int64)

    def labels(self, images: np.ndarray) -> np.ndarray:
        """Class ids N,H,W of a N,C,H,W float32 batch."""
        return self.to_labels(self.run(images))


def create_predictor(model_dir: str, opts: EngineOptions) -> EngineBase:
    """The predictor of opts.backend for an exported model folder."""
    if opts.backend == 'openvino':
        from segslim.deploy.ov_engine import OpenVINOPredictor
        return OpenVINOPredictor(model_dir, opts)
    if opts.backend == 'onnxruntime':
        from segslim.deploy.ort_engine import OnnxRuntimePredictor
        return OnnxRuntimePredictor(model_dir, opts)
    if opts.backend != 'paddle':
        raise UserError('--backend {} is unknown; use paddle, openvino or onnxruntime'.format(
            opts.backend))
    return Predictor(model_dir, opts)


class Predictor(EngineBase):
    """One Paddle Inference predictor for an exported model folder.

    `precision` says what the engine runs: 'fp32', 'bf16', 'fp16', 'int8', or
    'fp32 (QAT model, no INT8 kernels)' for a quantized model on a path that simulates its
    fake-quant ops in FP32 (no oneDNN, or GPU without TensorRT). `fallback` says what was
    changed to make the engine run (None if nothing); `engine` holds the op summary of the
    optimized program on CPU.
    """
    backend = 'paddle'

    def __init__(self, model_dir: str, opts: EngineOptions):
        check_engine_options(opts)
        super().__init__(model_dir, opts)
        self.trt = opts.device == 'gpu' and opts.use_trt
        self.input_name = (program_input_names(self.deploy['model']) or ['x'])[0]
        self.shape_file = None
        if self.trt and opts.enable_auto_tune:
            if self._fixed_shape():
                raise UserError('--enable_auto_tune: {} was exported with the fixed input shape '
                                '{}, so there is no shape range to tune; drop the flag'.format(
                                    model_dir, self.deploy['input_shape']))
            self.shape_file = opts.trt_shape_file
            if not self.shape_file:  # PaddleSeg tunes into a temporary file and deletes it
                tmp = tempfile.mkdtemp(prefix='segslim-trt-')
                weakref.finalize(self, shutil.rmtree, tmp, True)
                self.shape_file = os.path.join(tmp, 'shape_range_info.pbtxt')
        probe = self._probe_shape()
        self.trt_max = (max(TRT_MAX_SIDE, probe[2]), max(TRT_MAX_SIDE, probe[3]))
        self.precision = self._precision()
        self._create()
        if self.quantized and self.precision == 'int8' and self.opts.device == 'cpu' and \
                self.engine and not self.engine.get('int8_ops'):
            self.precision = NO_INT8

    def _precision(self) -> str:
        opts = self.opts
        if self.quantized:
            if (opts.device == 'cpu' and opts.enable_mkldnn) or self.trt:
                return 'int8'
            return NO_INT8
        return opts.precision

    def _fixed_shape(self) -> bool:
        shape = self.deploy.get('input_shape') or []
        return len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape)

    def _config(self, int8_ops: Optional[Sequence[str]], cache: Optional[str],
                native: Sequence[str] = ()) -> Any:
        """The engine config; `native` op types run in Paddle's own CPU kernels instead of
        oneDNN (ops oneDNN rejected for this model)."""
        opts = self.opts
        config = pi.Config(self.deploy['model'], self.deploy['params'])
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
            if int8_ops == 'default':
                config.enable_mkldnn_int8()
            else:
                config.enable_mkldnn_int8(set(int8_ops))
            for name in opts.delete_passes:
                config.delete_pass(name)
        if cache:
            config.set_optim_cache_dir(cache)
            config.enable_save_optim_model(True)
        return config

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
            n, c, h, w = self._probe_shape()
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
        for shape in ([1, 3, 256, 256], self._probe_shape()):
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
        ladders = (None,)
        if cpu_int8:  # the export's own op set first (deploy.yaml int8_ops), then ours
            own = tuple(self.deploy.get('int8_ops') or ())
            ladders = ((own,) if own and own not in INT8_FALLBACK_OPS else ()) + \
                INT8_FALLBACK_OPS
        errors: List[str] = []
        native: List[str] = []  # op types oneDNN rejected: they run in Paddle's kernels
        level = 0
        while level < len(ladders):
            ops = ladders[level]
            cache = tempfile.mkdtemp(prefix='segslim-opt-') if self.opts.device == 'cpu' \
                else None
            try:
                with quiet_native_output(not self.opts.print_detail):
                    self._use(pi.create_predictor(self._config(ops, cache, native)))
                    self.run(np.zeros(self._probe_shape(), np.float32))
                changes = []
                if level:
                    changes.append('oneDNN INT8 ops narrowed to {}'.format('/'.join(ops)))
                if native:
                    changes.append('{} run in Paddle\'s own kernels, not oneDNN'.format(
                        '/'.join(native)))
                if changes:
                    self.fallback = '{} after: {}'.format('; '.join(changes), errors[-1])
                optimized = os.path.join(cache, '_optimized.pdmodel') if cache else None
                if optimized and os.path.exists(optimized):
                    self.engine = op_summary(optimized)
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
