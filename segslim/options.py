"""What a command line controls about a run, as plain records: training, evaluation and
the inference engine. Each default is written here once; the argument parsers read their
defaults from these records, and a script that lacks a flag gets the same default."""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from segslim.config import Yaml
from segslim.errors import UserError

# Runtimes an INT8 ONNX file is placed for (--onnx_target); the first is the default.
ONNX_TARGETS = ('onnxruntime', 'tensorrt')
# PTQ activation-scale methods, the default first (it kept the demo models' mIoU best).
PTQ_ALGOS = ('abs_max', 'avg', 'hist', 'KL', 'mse')
# Post-training quantizers (ptq.py --quantizer); the first is the default.
PTQ_QUANTIZERS = ('paddleslim', 'nncf')
# Most ops NNCF's accuracy control reverts to FP32 (each costs a ranking pass over val).
MAX_REVERTED = 8
# The input every timing uses unless told otherwise (benchmark.py, auto_quant.py, engines).
TIMING_SHAPE = (1, 3, 512, 512)
# Images that calibrate activation scales (ptq.py --batch_nums, analysis.py and
# auto_quant.py --calib_images).
CALIBRATION_IMAGES = 32
# Passes over the calibration images per region of reconstruction PTQ in auto_quant.py and
# the comparison (PaddleSlim's default of 20 is sized for a GPU; each pass runs the FP32 and
# INT8 model on every image).
RECON_EPOCHS = 2
# PTQ weight rounding (ptq.py --round_type): to nearest (the default) or AdaRound.
ROUND_TYPES = ('round', 'adaround')
# Reconstruction PTQ (ptq.py --recon): PaddleSlim's quant_recon_static at each level.
RECON_LEVELS = {'layer': 'layer-wise', 'region': 'region-wise'}
# --int8_layers values, the default first.
INT8_LAYERS = ('auto', 'all')
# Devices the scripts accept (--device); a build without one says so at set-up.
DEVICES = ('cpu', 'gpu', 'xpu', 'npu', 'mlu')


# PaddleSeg's QAT learning rate (its slim docs: `--learning_rate 0.001`, for SGD-trained models)
QAT_LEARNING_RATE = 0.001
# Optimizers whose step does not scale with the learning rate as SGD's does: QAT fine-tunes
# them at a tenth of the config's own rate instead.
ADAPTIVE_OPTIMIZERS = ('Adam', 'AdamW')


def qat_learning_rate(cfg: Yaml) -> float:
    """The learning rate auto-quant and the comparison fine-tune QAT with: PaddleSeg's 0.001
    for SGD-trained configs, a tenth of the config's own for Adam and AdamW (SegFormer trains
    at 6e-5, and PP-LiteSeg-STDC1 with AdamW at 0.001 lost 2 mIoU points in 200 QAT iterations
    at 0.001)."""
    optimizer = (cfg.get('optimizer') or {}).get('type', 'SGD')
    if optimizer not in ADAPTIVE_OPTIMIZERS:
        return QAT_LEARNING_RATE
    return float((cfg.get('lr_scheduler') or {}).get('learning_rate', QAT_LEARNING_RATE)) / 10


def timing_shape(input_shape: Optional[Sequence[int]], export_shape: Optional[Sequence[int]],
                 default: Sequence[int]) -> List[int]:
    """The timing input of a command with --export_shape: --input_shape, else --export_shape,
    else `default`. Models exported at a fixed shape run at that shape only."""
    if input_shape and export_shape and list(input_shape) != list(export_shape):
        raise UserError('--input_shape {} differs from --export_shape {}: the exported models '
                        'take only that shape; drop --input_shape'.format(
                            ' '.join(map(str, input_shape)), ' '.join(map(str, export_shape))))
    return list(input_shape or export_shape or default)


def check_max_miou_drop(value: float) -> None:
    """--max_miou_drop is a mIoU fraction: refused outside (0, 1). The one range check: the
    parsers' type (cli.miou_drop) and AutoQuant both call it."""
    if not 0 < value < 1:
        raise UserError(f'--max_miou_drop {value} must be between 0 and 1 (0.005 = half a mIoU '
                        'point)')


def _from_args(cls: Any, args: argparse.Namespace, **given: Any) -> Any:
    """An instance of the dataclass `cls` from the flags `args` has (others keep their
    defaults), with `given` values on top."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name) and f.name not in given}
    values.update(given)
    return cls(**values)


@dataclass
class TrainOptions:
    """A training run (train.py, qat_train.py)."""
    iters: int
    batch_size: int
    save_dir: str = './output'
    do_eval: bool = False
    use_vdl: bool = False
    save_interval: int = 1000
    log_iters: int = 10
    keep_checkpoint_max: int = 5
    num_workers: int = 0
    seed: int = 0
    precision: str = 'fp32'                   # fp32 | fp16 (AMP, GPU)
    amp_level: str = 'O1'
    use_ema: bool = False
    repeats: int = 1                          # visits of each sample per epoch
    profiler_options: Optional[str] = None    # paddleseg.utils.train_profiler options
    distill: bool = False                     # qat_train: the FP32 model teaches the QAT one
    distill_weight: float = 1.0               # weight of the distillation term
    distill_temperature: float = 1.0          # softens both class distributions
    eval: 'EvalOptions' = field(default_factory=lambda: EvalOptions())

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> 'TrainOptions':
        return _from_args(cls, args, **given)


@dataclass
class EvalOptions:
    """How the val set is predicted (val.py, qat_val.py, training-time evaluation)."""
    aug_eval: bool = False
    scales: Union[float, List[float]] = 1.0
    flip_horizontal: bool = False
    flip_vertical: bool = False
    is_slide: bool = False
    crop_size: Optional[Sequence[int]] = None
    stride: Optional[Sequence[int]] = None
    num_workers: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  cfg: Optional[Yaml] = None) -> 'EvalOptions':
        """The flags, falling back on the config's `test_config` for each one not given."""
        test_cfg = dict((cfg or {}).get('test_config') or {})
        values = {}
        for f in dataclasses.fields(cls):
            flag = getattr(args, f.name, None)
            values[f.name] = flag or test_cfg.get(f.name, f.default)
        if isinstance(values['scales'], list) and len(values['scales']) == 1:
            values['scales'] = float(values['scales'][0])
        values['num_workers'] = max(int(values['num_workers'] or 0), 0)
        return cls(**values)

    def kwargs(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Rounding:
    """How PTQ sets the INT8 weights (ptq.py): round to nearest or AdaRound per tensor in
    quant_post_static, optionally with bias correction; or reconstruction (`recon`: AdaRound
    learned layer by layer, or BRECQ region by region) in quant_recon_static, optionally with
    QDrop (activations quantized at random, probability 0.5, while it learns)."""
    round_type: str = ROUND_TYPES[0]
    bias_correction: bool = False
    recon: Optional[str] = None       # a key of RECON_LEVELS
    qdrop: bool = False
    recon_epochs: int = 20            # PaddleSlim's defaults
    recon_lr: float = 0.1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> 'Rounding':
        rounding: Rounding = _from_args(cls, args)
        rounding.check()
        return rounding

    def check(self) -> None:
        """Refuses combinations PaddleSlim would ignore, before any work."""
        if self.qdrop and not self.recon:
            raise UserError('--qdrop works in reconstruction only: add --recon layer|region')
        if self.recon and self.round_type != 'round':
            raise UserError('--recon always learns an AdaRound rounding: drop --round_type')

    @property
    def learned(self) -> bool:
        """Whether the rounding is learned (AdaRound or reconstruction), not to nearest."""
        return bool(self.recon) or self.round_type != 'round'

    @property
    def name(self) -> str:
        """A short label: round, adaround, recon-layer, recon-region+qdrop, +bc."""
        base = f'recon-{self.recon}' if self.recon else self.round_type
        return base + ('+qdrop' if self.qdrop else '') + ('+bc' if self.bias_correction else '')


NEAREST = Rounding()  # PaddleSlim's default: every weight to its nearest INT8 value


@dataclass
class EngineOptions:
    """How to run an exported model: engine, device, precision and the engine's knobs."""
    device: str = 'cpu'
    backend: str = 'paddle'          # see segslim.deploy.engines.BACKENDS
    precision: str = 'fp32'          # fp32 | bf16 (CPU) | int8 | fp16 (GPU TensorRT)
    cpu_threads: int = 2
    enable_mkldnn: bool = True
    use_trt: bool = False
    min_subgraph_size: int = 3
    enable_auto_tune: bool = False
    gpu_mem_mb: int = 500
    gpu_id: int = 0
    trt_shape_file: Optional[str] = None
    input_shape: Sequence[int] = TIMING_SHAPE
    print_detail: bool = False       # the engine's own (glog) output
    # auto: a quantized model runs INT8 only for the kinds of layer where it is faster on
    # this CPU (segslim.deploy.int8_kinds; OpenVINO and onnxruntime); all: every one
    int8_layers: str = 'auto'

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> 'EngineOptions':
        backend = getattr(args, 'backend', cls.backend)
        if not isinstance(backend, str):  # benchmark.py takes several
            backend = backend[0]
        given.setdefault('backend', backend)
        if getattr(args, 'auto_tuned_shape_file', None):
            given.setdefault('trt_shape_file', args.auto_tuned_shape_file)
        if getattr(args, 'input_shape', None):
            given.setdefault('input_shape', tuple(args.input_shape))
        return _from_args(cls, args, **given)
