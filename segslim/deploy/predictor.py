"""Paddle Inference predictors for exported models, with an INT8 path that never crashes
and never silently runs FP32: a failing oneDNN op set is narrowed and the change reported."""
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np
import yaml

from segslim import builder
from segslim.data.datasets import read_image
from segslim.errors import UserError
from segslim.export import read_program

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
QUANT_OP_TYPES = ('quantize_linear', 'dequantize_linear', 'fake_quantize_dequantize_abs_max',
                  'fake_channel_wise_quantize_dequantize_abs_max',
                  'fake_quantize_dequantize_moving_average_abs_max')


@dataclass
class EngineOptions:
    """How to run a model: device, precision and the engine's knobs."""
    device: str = 'cpu'
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


def conv_summary(model_file: str) -> Dict[str, Any]:
    """{'conv_ops', 'int8_conv_ops', 'fp32_conv_ops': [names]} of an optimized program."""
    desc = read_program(model_file)  # keep it alive: the block points into it
    block = desc.block(0)
    total, int8, fp32 = 0, 0, []
    for i in range(block.op_size()):
        op = block.op(i)
        if op.type() not in CONV_TYPES:
            continue
        total += 1
        dtype = op.attr('mkldnn_data_type') if op.has_attr('mkldnn_data_type') else ''
        if dtype == 'int8':
            int8 += 1
        else:
            fp32.append(op.output('Output')[0] if 'Output' in op.output_names() else op.type())
    return {'conv_ops': total, 'int8_conv_ops': int8, 'fp32_conv_ops': fp32}


class Preprocessor:
    """The deploy.yaml transforms applied to an image file, as in deployment."""

    def __init__(self, transforms: List[Dict[str, Any]]):
        from paddleseg.transforms import Compose
        self.compose = Compose(builder.build_transforms(transforms, 'Deploy.transforms'))

    def __call__(self, path: str):
        data = self.compose({'img': read_image(path), 'trans_info': [], 'gt_fields': []})
        return data['img'], data['trans_info']


def restore_size(labels: np.ndarray, trans_info: list) -> np.ndarray:
    """Undoes resize/padding records of the transforms on a H,W label map."""
    for item in reversed(trans_info):
        mode = item[0][0] if isinstance(item[0], list) else item[0]
        h, w = item[1][0], item[1][1]
        if mode == 'resize':
            labels = cv2.resize(labels.astype(np.int32), (w, h),
                                interpolation=cv2.INTER_NEAREST)
        elif mode == 'padding':
            labels = labels[:h, :w]
    return labels


@contextlib.contextmanager
def quiet_native_output(enabled: bool = True):
    """Silences what the C++ passes print to stdout/stderr (the oneDNN quantization logs)."""
    if os.environ.get('SEGSLIM_DEBUG') or not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


class Predictor:
    """One Paddle Inference predictor for an exported model folder.

    `fallback` says what was changed to make the engine run (None if nothing); `engine`
    holds the conv-op summary of the optimized program on CPU.
    """

    def __init__(self, model_dir: str, opts: EngineOptions):
        self.deploy = read_deploy(model_dir)
        self.opts = opts
        self.model_dir = model_dir
        ops = program_op_types(self.deploy['model'])
        self.quantized = any(t in QUANT_OP_TYPES for t in ops)
        self.fallback: Optional[str] = None
        self.engine: Dict[str, Any] = {}
        if opts.precision == 'int8' and not self.quantized:
            raise UserError('{} holds no quantization scales, so INT8 would silently run FP32; '
                            'export it with slim/quant/qat_export.py'.format(model_dir))
        self._create()

    def _config(self, int8_ops: Optional[Sequence[str]], cache: Optional[str]) -> Any:
        opts = self.opts
        config = pi.Config(self.deploy['model'], self.deploy['params'])
        if not opts.print_detail:
            config.disable_glog_info()
        if opts.device == 'gpu':
            config.enable_use_gpu(opts.gpu_mem_mb, opts.gpu_id)
            if opts.use_trt:
                self._enable_trt(config)
            return config
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(opts.cpu_threads)
        if not opts.enable_mkldnn:
            config.disable_mkldnn()  # a fresh Config has oneDNN on in Paddle 2.6
            return config
        config.enable_mkldnn()
        config.set_mkldnn_cache_capacity(10)
        if opts.precision == 'bf16':
            config.enable_mkldnn_bfloat16()
        if opts.precision == 'int8' or self.quantized:
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
                     'int8': pi.PrecisionType.Int8}[opts.precision]
        if self.quantized:
            precision = pi.PrecisionType.Int8
        config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=1,
                                      min_subgraph_size=opts.min_subgraph_size,
                                      precision_mode=precision, use_static=False,
                                      use_calib_mode=False)
        if opts.enable_auto_tune:
            config.enable_tuned_tensorrt_dynamic_shape(self._shape_file(), True)
        else:
            n, c, h, w = opts.input_shape
            name = 'x'
            config.set_trt_dynamic_shape_info({name: [1, c, 32, 32]},
                                              {name: [max(n, 1), c, 2048, 2048]},
                                              {name: [max(n, 1), c, h, w]})

    def _shape_file(self) -> str:
        return self.opts.trt_shape_file or os.path.join(self.deploy['dir'],
                                                        'shape_range_info.pbtxt')

    def _collect_shapes(self) -> None:
        """--enable_auto_tune: a plain GPU run records the input/intermediate shape ranges
        that TensorRT then uses (Paddle's tuned dynamic shape)."""
        config = pi.Config(self.deploy['model'], self.deploy['params'])
        config.enable_use_gpu(self.opts.gpu_mem_mb, self.opts.gpu_id)
        config.collect_shape_range_info(self._shape_file())
        self._use(pi.create_predictor(config))
        for shape in ([1, 3, 256, 256], self._probe_shape()):
            self.run(np.zeros(shape, np.float32))

    def _create(self) -> None:
        if self.opts.device == 'gpu' and self.opts.use_trt and self.opts.enable_auto_tune \
                and not os.path.exists(self._shape_file()):
            self._collect_shapes()
        cpu_int8 = self.opts.device == 'cpu' and self.opts.enable_mkldnn and self.quantized
        ladders = INT8_FALLBACK_OPS if cpu_int8 else (None,)
        errors = []
        for level, ops in enumerate(ladders):
            cache = tempfile.mkdtemp(prefix='segslim-opt-') if self.opts.device == 'cpu' \
                else None
            try:
                with quiet_native_output(not self.opts.print_detail):
                    self._use(pi.create_predictor(self._config(ops, cache)))
                    self.run(np.zeros(self._probe_shape(), np.float32))
                if level:
                    self.fallback = 'oneDNN INT8 ops narrowed to {} after: {}'.format(
                        '/'.join(ops), errors[-1])
                optimized = os.path.join(cache, '_optimized.pdmodel') if cache else None
                if optimized and os.path.exists(optimized):
                    self.engine = conv_summary(optimized)
                return
            except Exception as e:  # the engine reports failures as generic errors
                errors.append(str(e).strip().splitlines()[-1][:160] if str(e).strip()
                              else type(e).__name__)
            finally:
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)
        raise UserError('Paddle Inference cannot run {} ({}); try --device cpu without '
                        'oneDNN or re-export'.format(self.model_dir, '; '.join(errors)))

    def _probe_shape(self) -> List[int]:
        shape = list(self.deploy.get('input_shape') or [])
        if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape):
            return shape
        return list(self.opts.input_shape)

    def _use(self, predictor: Any) -> None:
        self.predictor = predictor
        self._input = predictor.get_input_handle(predictor.get_input_names()[0])
        self._output = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(self, images: np.ndarray) -> np.ndarray:
        """Runs a N,C,H,W float32 batch; returns the first output."""
        self._input.reshape(list(images.shape))
        self._input.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        return self._output.copy_to_cpu()

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
