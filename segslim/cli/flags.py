"""The argument-parser factory every script starts from, and the error-to-exit-code edge.

Flag names, types, defaults and optionality follow PaddleSeg 2.8's scripts (tools/*.py,
deploy/slim/quant/qat_*.py, deploy/python/infer.py), so their command lines run unchanged;
README.md ("Coming from PaddleSeg") lists where a default differs on purpose.
"""
import argparse
import os
import sys
from typing import Any, Callable, List, Optional

from segslim.deploy.engines import BACKEND_NAMES
from segslim.deploy.results import Precision
from segslim.errors import UserError
from segslim.options import (
    DEVICES,
    INT8_LAYERS,
    ONNX_TARGETS,
    EngineOptions,
    EvalOptions,
    TrainOptions,
    check_max_miou_drop,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error:` line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'error: {self.prog}: {message}; see {self.prog} --help\n')


def str2bool(value: str) -> bool:
    """PaddleSeg parses these flags with `type=eval` (True/False); unlike eval, a value that
    is neither is refused instead of being read as something else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('true', '1', 'yes', 'on'):
        return True
    if text in ('false', '0', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got {value!r}')


def add_bool(p: argparse.ArgumentParser, flag: str, default: bool, help: str) -> None:
    """A boolean flag that takes `--flag`, `--flag True|False` and `--flag=True|False`."""
    p.add_argument(flag, type=str2bool, nargs='?', const=True, default=default,
                   metavar='True|False', help=f'{help} (default {default})')


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f'must be a positive number, got {value}')
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f'must be zero or more, got {value}')
    return number


def miou_drop(value: str) -> float:
    """--max_miou_drop: a mIoU fraction in (0, 1), refused at parse time, before any work."""
    try:
        number = float(value)
        check_max_miou_drop(number)
    except (ValueError, UserError) as e:
        raise argparse.ArgumentTypeError(
            f'must be a mIoU fraction between 0 and 1 (0.005 = half a point), got {value}') \
            from e
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return number


def base_parser(description: str, config_required: bool = True,
                devices=DEVICES) -> argparse.ArgumentParser:
    """--config, --device, --opts and --debug, shared by every training-side script."""
    p = ArgumentParser(description=description)
    p.add_argument('--config', required=config_required, help='the YAML config file')
    p.add_argument('--device', choices=list(devices), default=None,
                   help='default: gpu when paddle is compiled with CUDA, else cpu')
    p.add_argument('--opts', nargs='+', default=None, metavar='KEY=VALUE',
                   help='override config keys, e.g. model.align_corners=True')
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    return p


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags train.py and qat_train.py share (names and defaults of PaddleSeg's)."""
    p.add_argument('--iters', type=int, default=None, help='iterations (overrides config)')
    p.add_argument('--batch_size', type=int, default=None,
                   help='images per step (per process under paddle.distributed.launch)')
    p.add_argument('--learning_rate', type=float, default=None,
                   help='overrides lr_scheduler.learning_rate')
    p.add_argument('--save_interval', '--save_interval_iters', dest='save_interval',
                   type=positive_int, default=TrainOptions.save_interval,
                   help='save (and evaluate) every N iterations; the last one is always saved')
    p.add_argument('--save_dir', default=TrainOptions.save_dir, help='run folder')
    p.add_argument('--resume_model', default=None, help='an iter_N folder to continue from')
    p.add_argument('--keep_checkpoint_max', type=int,
                   default=TrainOptions.keep_checkpoint_max,
                   help='iter_N folders to keep (best_model is always kept)')
    p.add_argument('--num_workers', type=int, default=TrainOptions.num_workers,
                   help='data loader processes')
    p.add_argument('--do_eval', action='store_true', help='evaluate at every save')
    p.add_argument('--use_vdl', action='store_true', help='write VisualDL scalars')
    p.add_argument('--log_iters', type=positive_int, default=TrainOptions.log_iters,
                   help='log every N iterations')
    p.add_argument('--seed', type=int, default=None,
                   help='seeds weight init, data order and augmentation (default: drawn at '
                        'random, logged and kept in the checkpoints)')
    p.add_argument('--cpu_processes', type=positive_int, default=None,
                   help='on CPU, train as this many local processes of one data-parallel job, '
                        'each on its share of --cpu_threads and of each step\'s --batch_size '
                        'images, batch norm over all of them (default: as many as split both '
                        'evenly: one per core; 1 trains in this process)')
    return add_cpu_threads(p)


def add_cpu_threads(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--cpu_threads of the commands that train or run the model in dygraph."""
    p.add_argument('--cpu_threads', '--threads', dest='cpu_threads', type=positive_int,
                   default=None,
                   help='threads of Paddle\'s CPU kernels (default: every core this process '
                        'may use, or OMP_NUM_THREADS; results depend on the count)')
    return p


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags val.py and qat_val.py share."""
    p.add_argument('--model_path', default=None,
                   help='model.pdparams to evaluate (default: the config\'s model.pretrained)')
    p.add_argument('--num_workers', type=int, default=EvalOptions.num_workers,
                   help='processes that read and transform images ahead')
    p.add_argument('--aug_eval', action='store_true', help='multi-scale / flip evaluation')
    p.add_argument('--scales', nargs='+', type=float, default=None,
                   help=f'with --aug_eval (default {EvalOptions.scales})')
    p.add_argument('--flip_horizontal', action='store_true', help='with --aug_eval')
    p.add_argument('--flip_vertical', action='store_true', help='with --aug_eval')
    p.add_argument('--is_slide', action='store_true', help='sliding-window inference')
    p.add_argument('--crop_size', nargs=2, type=int, default=None, metavar=('W', 'H'))
    p.add_argument('--stride', nargs=2, type=int, default=None, metavar=('W', 'H'))
    add_data_format(p)
    p.add_argument('--json', default=None, help='also write the metrics to this JSON file')
    return p


def add_data_format(p: argparse.ArgumentParser) -> None:
    p.add_argument('--data_format', choices=['NCHW', 'NHWC'], default='NCHW',
                   help='input layout; NHWC is for DeepLabV3P only, as in PaddleSeg')


def add_export_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags export.py and qat_export.py share."""
    p.add_argument('--model_path', default=None,
                   help='model.pdparams to export (default: the config\'s model.pretrained)')
    p.add_argument('--save_dir', default='./output/inference_model',
                   help='where the inference model goes')
    p.add_argument('--output_op', choices=['argmax', 'softmax', 'none'], default=None,
                   help='head on the logits (default argmax)')
    p.add_argument('--with_softmax', action='store_true',
                   help='same as --output_op softmax (wins over --output_op, as upstream)')
    p.add_argument('--without_argmax', action='store_true',
                   help='same as --output_op none (wins over --output_op, as upstream)')
    add_input_shape(p)
    add_to_onnx(p)
    return p


def add_input_shape(p: argparse.ArgumentParser, what: str = 'the exported model') -> None:
    """--input_shape: a fixed input shape of what the command exports (default dynamic)."""
    p.add_argument('--input_shape', nargs='+', type=int, default=None, metavar='N C H W',
                   help=f'fixed input shape of {what}, e.g. 1 3 512 512 (default dynamic; '
                        'the ONNX of a model with adaptive pooling, such as PP-LiteSeg, needs '
                        'one)')


def add_export_shape(p: argparse.ArgumentParser) -> None:
    """--export_shape of the commands that run others: every model they export takes this
    fixed input shape (each command's --input_shape), and it is their default timing input."""
    p.add_argument('--export_shape', nargs=4, type=positive_int, default=None,
                   metavar=('N', 'C', 'H', 'W'),
                   help='fixed input shape of every model exported (default dynamic; the ONNX '
                        'of a model with adaptive pooling, such as PP-LiteSeg, needs one); '
                        'also the default timing input')


def add_to_onnx(p: argparse.ArgumentParser) -> None:
    p.add_argument('--to_onnx', action='store_true',
                   help='also write model.onnx beside the Paddle program (INT8 models: QDQ with '
                        'INT8 weights, placed for --onnx_target); pip install -e .[onnx]')
    p.add_argument('--onnx_target', choices=ONNX_TARGETS, default=None,
                   help='the runtime the INT8 ONNX is placed for (implies --to_onnx): '
                        'onnxruntime (default; u8 activations, QLinearConv on CPU) or tensorrt '
                        '(s8 symmetric, Q/DQ on the inputs of weighted layers)')


def add_rounding_args(p: argparse.ArgumentParser) -> None:
    """ptq.py's weight rounding: AdaRound, bias correction, reconstruction (Rounding)."""
    from segslim.options import RECON_LEVELS, ROUND_TYPES, Rounding
    p.add_argument('--round_type', choices=ROUND_TYPES, default=Rounding.round_type,
                   help='weights rounded to nearest, or by AdaRound (quant_post_static)')
    p.add_argument('--bias_correction', action='store_true',
                   help='correct each layer\'s bias for the mean error its INT8 weights add')
    p.add_argument('--recon', choices=sorted(RECON_LEVELS), default=None,
                   help='reconstruction PTQ (quant_recon_static): learn the rounding that '
                        'best reproduces each layer\'s (layer: AdaRound) or each block\'s '
                        '(region: BRECQ) FP32 output on the calibration images')
    p.add_argument('--qdrop', action='store_true',
                   help='with --recon: quantize activations at random (p=0.5) while learning '
                        '(QDrop)')
    p.add_argument('--recon_epochs', type=positive_int, default=Rounding.recon_epochs,
                   help='with --recon: passes over the calibration images per layer/region')
    p.add_argument('--recon_lr', type=positive_float, default=Rounding.recon_lr,
                   help='with --recon: learning rate of the rounding')


def add_engine_args(p: argparse.ArgumentParser,
                    many_backends: bool = False) -> argparse.ArgumentParser:
    """Engine flags infer.py and benchmark.py share (PaddleSeg deploy names); benchmark.py
    takes several --backend values (a row set each)."""
    p.add_argument('--backend', choices=BACKEND_NAMES, nargs='+' if many_backends else None,
                   default=['paddle'] if many_backends else 'paddle',
                   help='paddle: Paddle Inference (oneDNN on CPU, TensorRT on GPU); openvino: '
                        'OpenVINO on CPU (pip install -e .[openvino]); onnxruntime: the '
                        'folder\'s model.onnx (export with --to_onnx) on CPU')
    if not any(a.dest == 'device' for a in p._actions):
        p.add_argument('--device', choices=DEVICES, default=None,
                       help='default: gpu when paddle is compiled with CUDA, else cpu')
    add_bool(p, '--use_trt', EngineOptions.use_trt, 'TensorRT on GPU')
    p.add_argument('--precision', choices=[v.value for v in Precision],
                   default=EngineOptions.precision,
                   help='engine precision; a quantized model always runs INT8 (with bf16 on '
                        'OpenVINO: its other ops in bf16)')
    p.add_argument('--min_subgraph_size', type=int, default=EngineOptions.min_subgraph_size,
                   help='TensorRT subgraphs')
    add_bool(p, '--enable_auto_tune', EngineOptions.enable_auto_tune,
             'TensorRT: collect the dynamic shape ranges on the images first')
    p.add_argument('--auto_tuned_shape_file', default=None,
                   help='where --enable_auto_tune keeps the shape ranges (default: a '
                        'temporary file, deleted after the run)')
    p.add_argument('--cpu_threads', '--threads', dest='cpu_threads', type=positive_int,
                   default=EngineOptions.cpu_threads, help='CPU math threads (every backend)')
    add_bool(p, '--enable_mkldnn', EngineOptions.enable_mkldnn, 'oneDNN on CPU')
    p.add_argument('--int8_layers', choices=INT8_LAYERS, default=EngineOptions.int8_layers,
                   help='auto: a quantized model runs INT8 only for the kinds of layer '
                        '(depthwise, grouped, 1x1, larger convs, matmuls; pools and channel '
                        'shuffles on OpenVINO) '
                        'that this CPU runs faster in INT8, timed when the engine loads '
                        '(every engine on CPU); '
                        'all: every quantized layer INT8')
    add_bool(p, '--benchmark', False, 'print preprocess / inference / postprocess times')
    add_bool(p, '--print_detail', EngineOptions.print_detail,
             'show Paddle Inference\'s own (glog) output')
    return p


def run(main: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace) -> int:
    """Runs main(args): a UserError or a failing OS call becomes one line on stderr and
    exit code 2; Ctrl-C exits 130; anything else exits 1 with a one-line summary.
    --debug (or SEGSLIM_DEBUG=1) shows the traceback instead."""
    debug = getattr(args, 'debug', False) or bool(os.environ.get('SEGSLIM_DEBUG'))
    try:
        return int(main(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except OSError as e:  # a path the user gave cannot be read or written
        if debug:
            raise
        print('error: {}{} ({}); check the path and its permissions'.format(
            e.filename + ': ' if e.filename else '', e.strerror or type(e).__name__,
            type(e).__name__), file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print('error: out of memory; lower --batch_size or the input size', file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        first = str(e).strip().splitlines()
        print('error: {}: {} (rerun with --debug for the traceback)'.format(
            type(e).__name__, first[-1] if first else ''), file=sys.stderr)
        return 1


def to_argv(**flags: Any) -> List[str]:
    """Keyword flags as the command line they stand for: name=value is '--name value',
    True is '--name', False and None are left out, a list or tuple gives each item."""
    argv: List[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append('--' + name)
        if value is True:
            continue
        argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


def entry(parser: argparse.ArgumentParser,
          main: Callable[[argparse.Namespace], Optional[int]],
          argv: Optional[List[str]] = None) -> None:
    """Parse, run, exit: what every command does."""
    sys.exit(run(main, parser.parse_args(argv)))
