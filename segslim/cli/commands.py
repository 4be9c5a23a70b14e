"""One function per command: its own flags on top of the shared parser, then the workflow.
The scripts (train.py, slim/quant/qat_*.py, deploy/python/*.py) and the console scripts
of setup.py all call these; auto-quant builds a step's options with the same parser
(`options`) and runs its workflow (`workflow`) in a child process."""
import argparse
import importlib
import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Tuple

from segslim.cli import flags
from segslim.deploy.engines import BACKEND_NAMES
from segslim.errors import UserError
from segslim.options import (
    CALIBRATION_IMAGES,
    MAX_REVERTED,
    PTQ_ALGOS,
    PTQ_QUANTIZERS,
    TIMING_SHAPE,
    EngineOptions,
    TrainOptions,
)

# val images qat_export and ptq check their INT8 engine on
VERIFY_IMAGES = 8


Main = Callable[[argparse.Namespace], Optional[int]]
_COMMANDS: Dict[str, Callable[[], Tuple[argparse.ArgumentParser, Main]]] = {}


def register(build: Callable[[], Tuple[argparse.ArgumentParser, Main]]
             ) -> Callable[..., None]:
    """Registers a command's (parser, workflow) builder; returns the function that parses
    argv (default sys.argv) and runs it, exiting with its code."""
    _COMMANDS[build.__name__] = build

    def command(argv: Optional[List[str]] = None) -> None:
        flags.entry(*build(), argv)
    command.__name__ = command.__qualname__ = build.__name__
    command.__doc__ = build.__doc__
    return command


def _builder(command: str) -> Callable[[], Tuple[argparse.ArgumentParser, Main]]:
    """A registered command (the tools' commands register when segslim.cli.tools loads)."""
    return _COMMANDS[command]


def options(command: str, **given: Any) -> argparse.Namespace:
    """The options `command` runs with for the flags `given` as keywords: its own parser's
    defaults and checks (a value it refuses raises UserError naming the flag)."""
    parser = _builder(command)()[0]
    argv = flags.to_argv(**given)
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise UserError(f'{command}: invalid options {" ".join(argv)}') from None


def workflow(command: str) -> Main:
    """The function `command` runs on its parsed options."""
    return _builder(command)()[1]


def _run_workflow(module: str, command: str, args: argparse.Namespace) -> int:
    importlib.import_module(module)  # registers the command in this fresh interpreter
    return int(workflow(command)(args) or 0)


def _child(target: Callable[..., int], args: Tuple[Any, ...], conn: Connection) -> None:
    """The child's side of call_in_child: the target's exit code, or the user error it raised,
    sent back to the parent (anything else shows its traceback here and exits 1)."""
    try:
        conn.send(('exit', target(*args)))
    except UserError as e:
        conn.send(('error', str(e)))
    except KeyboardInterrupt:
        conn.send(('error', 'interrupted'))


def _end_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def call_in_child(name: str, target: Callable[..., int], *args: Any) -> None:
    """target(*args) (a module-level function returning an exit code) in a fresh interpreter;
    its failure becomes a UserError naming `name` (its own message, or how the process ended).
    The child may start children of its own (a comparison runs auto-quant, which runs its
    steps so); it is ended if the parent stops waiting for it, by an error, Ctrl-C or a
    SIGTERM (which then ends the parent with exit code 143)."""
    ctx = multiprocessing.get_context('spawn')
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(target, args, send))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGTERM, _end_on_sigterm)
    try:
        child.start()
        send.close()
        try:
            result = receive.recv()
        except EOFError:  # the child died without a word: a crash or a kill
            result = None
        child.join()
    finally:
        if child.is_alive():
            child.terminate()
            child.join()
        if main_thread:  # a handler installed outside Python reads back as None
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if result and result[0] == 'error':
        raise UserError(f'{name} failed: {result[1]}')
    if result is None or child.exitcode != 0 or result[1] != 0:
        code = result[1] if result else child.exitcode
        raise UserError(f'{name} failed (exit code {code}); its log is above')


def run_in_child(command: str, args: argparse.Namespace) -> None:
    """`command`'s workflow on `args` in a fresh interpreter (call_in_child)."""
    call_in_child(command, _run_workflow, _builder(command).__module__, command, args)


def run_step(command: str, **given: Any) -> None:
    """`command` with the flags `given` (its parser's defaults and checks) in a child process
    of its own: a step's memory is freed when it ends, and a crash in a native library fails
    the step, not the caller."""
    run_in_child(command, options(command, **given))


def lazy(module: str, name: str, **kwargs: Any) -> Main:
    """The workflow `module.name`, imported when it runs (--help stays fast)."""
    def main(args: argparse.Namespace) -> Optional[int]:
        return getattr(importlib.import_module(module), name)(args, **kwargs)
    return main


def make_parser(description: str, *adders,
                config_required: bool = True) -> argparse.ArgumentParser:
    p = flags.base_parser(description, config_required=config_required)
    for add in adders:
        add(p)
    return p


@register
def train() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Train a segmentation model (FP32).', flags.add_train_args)
    p.add_argument('--precision', choices=['fp32', 'fp16'], default=TrainOptions.precision,
                   help='fp16 enables automatic mixed precision (GPU only)')
    p.add_argument('--amp_level', choices=['O1', 'O2'], default=TrainOptions.amp_level,
                   help='AMP level')
    p.add_argument('--use_ema', action='store_true',
                   help='also keep an EMA of the weights (best_ema_model/, ema_model.pdparams)')
    p.add_argument('--profiler_options', default=None,
                   help='paddle profiler, e.g. "batch_range=[10,20];profile_path=prof.log" '
                        '(paddleseg.utils.train_profiler)')
    flags.add_data_format(p)
    p.add_argument('--repeats', type=flags.positive_int, default=TrainOptions.repeats,
                   help='visit each training sample this many times per epoch')
    return p, lazy('segslim.cli.workflows', 'run_train')


@register
def val() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Evaluate a segmentation model (FP32).', flags.add_eval_args)
    flags.add_bool(p, '--auc_roc', False, 'also compute the AUC-ROC of the class scores')
    return p, lazy('segslim.cli.workflows', 'run_val')


@register
def export() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Export an FP32 inference model.', flags.add_export_args)
    return p, lazy('segslim.cli.workflows', 'run_export')


@register
def qat_train() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Quantization-aware training (PaddleSlim QAT) from FP32 weights.',
                flags.add_train_args)
    p.add_argument('--model_path', default=None,
                   help='FP32 model.pdparams to start from (default: the config\'s '
                        'pretrained weights, else random init)')
    p.add_argument('--allow_partial', action='store_true',
                   help='load FP32 weights even if some keys are missing or mismatched')
    p.add_argument('--distill', action='store_true',
                   help='distil from the FP32 model of --model_path (frozen): adds '
                        '--distill_weight x KL(teacher || student) of the per-pixel class '
                        'distributions to the loss')
    p.add_argument('--distill_weight', type=flags.non_negative_float,
                   default=TrainOptions.distill_weight, help='weight of the distillation term')
    p.add_argument('--distill_temperature', type=flags.positive_float,
                   default=TrainOptions.distill_temperature,
                   help='temperature of both class distributions (the term is scaled by its '
                        'square)')
    return p, lazy('segslim.cli.workflows', 'run_train', quant=True)


@register
def qat_val() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Evaluate a quantization-aware trained model.', flags.add_eval_args)
    return p, lazy('segslim.cli.workflows', 'run_val', quant=True)


@register
def qat_export() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Export a QAT model as an INT8 inference model.', flags.add_export_args)
    p.add_argument('--verify_images', type=int, default=VERIFY_IMAGES,
                   help='compare the INT8 engine with the QAT model on this many val images '
                        '(0: skip)')
    return p, lazy('segslim.cli.workflows', 'run_export', quant=True)


@register
def ptq() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Post-training quantization (PaddleSlim quant_post_static) of FP32 weights '
                'or an FP32 inference model.')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--model_dir', default=None,
                     help='an FP32 inference model folder (export.py) to quantize')
    src.add_argument('--model_path', default=None,
                     help='FP32 model.pdparams to export and quantize (default: the config\'s '
                          'model.pretrained)')
    p.add_argument('--save_dir', default='quant_model', help='where the INT8 model goes')
    p.add_argument('--batch_nums', type=flags.positive_int, default=CALIBRATION_IMAGES,
                   help='calibration batches drawn from the train set (upstream default 10)')
    p.add_argument('--batch_size', type=flags.positive_int, default=1,
                   help='images per calibration batch')
    p.add_argument('--algo', choices=PTQ_ALGOS, default=PTQ_ALGOS[0],
                   help='activation scale method (upstream\'s ptq.py uses KL; abs_max kept the '
                        'demo models\' mIoU best, see docs/measurements.md)')
    p.add_argument('--quantizer', choices=PTQ_QUANTIZERS, default=PTQ_QUANTIZERS[0],
                   help='paddleslim: quant_post_static, a Paddle INT8 model every engine runs; '
                        'nncf: OpenVINO\'s own quantizer, an OpenVINO IR model only --backend '
                        'openvino runs (pip install -e .[openvino])')
    p.add_argument('--max_miou_drop', type=flags.miou_drop, default=None,
                   help='with --quantizer nncf: its accuracy-controlled variant reverts the '
                        'costliest ops to FP32 until the OpenVINO mIoU on --num_images val '
                        'images is within this of FP32, e.g. 0.005')
    p.add_argument('--num_images', type=flags.positive_int, default=None,
                   help='val images --max_miou_drop is checked on (default: all)')
    p.add_argument('--max_reverted', type=flags.positive_int, default=MAX_REVERTED,
                   help='with --max_miou_drop: most ops reverted to FP32 (each one costs a '
                        'ranking pass over the val images)')
    p.add_argument('--output_op', choices=['argmax', 'softmax', 'none'], default=None,
                   help='head of the exported model with --model_path (default argmax)')
    p.add_argument('--with_softmax', action='store_true', help='same as --output_op softmax')
    p.add_argument('--without_argmax', action='store_true', help='same as --output_op none')
    p.add_argument('--verify_images', type=int, default=VERIFY_IMAGES,
                   help='compare the INT8 engine with the FP32 engine on this many val images '
                        '(0: skip)')
    flags.add_rounding_args(p)
    flags.add_input_shape(p, 'the FP32 export it quantizes (with --model_path)')
    flags.add_to_onnx(p)
    flags.add_cpu_threads(p)
    return p, lazy('segslim.cli.workflows', 'run_ptq')


@register
def analysis() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('Quantization sensitivity of each layer, and a skip list (optionally the '
                'smallest one meeting a mIoU budget on the engine).')
    p.add_argument('--model_path', default=None,
                   help='FP32 model.pdparams (default: the config\'s model.pretrained)')
    p.add_argument('--save_dir', default='output/analysis',
                   help='sensitivity.md, sensitivity.png and skip_layers.yml go here')
    p.add_argument('--num_images', type=flags.positive_int, default=8,
                   help='val images each measurement runs on')
    p.add_argument('--calib_images', type=flags.positive_int, default=CALIBRATION_IMAGES,
                   help='train images that calibrate the activation scales')
    p.add_argument('--max_miou_drop', type=flags.miou_drop, default=None,
                   help='find the smallest skip set whose PTQ model stays within this mIoU '
                        'of FP32 on the engine, e.g. 0.005')
    p.add_argument('--algo', choices=PTQ_ALGOS, default=PTQ_ALGOS[0],
                   help='PTQ scale method of the engine check (as ptq.py)')
    p.add_argument('--backend', choices=BACKEND_NAMES, default='paddle',
                   help='the CPU engine --max_miou_drop is checked on: paddle (Paddle '
                        'Inference, oneDNN), openvino, or onnxruntime (on the --to_onnx file)')
    flags.add_input_shape(p, 'the FP32 and INT8 exports the engine check runs')
    flags.add_cpu_threads(p)
    return p, lazy('segslim.cli.workflows', 'run_analysis')


@register
def auto_quant() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('From FP32 weights to the fastest INT8 model whose mIoU on the engine stays '
                'within a bound: PTQ, then a skip set, then QAT with distillation, each '
                'checked on every engine.')
    p.add_argument('--model_path', required=True, help='FP32 model.pdparams')
    p.add_argument('--save_dir', default='output/auto_quant',
                   help='every candidate, report.md, and best/ (the chosen model)')
    p.add_argument('--max_miou_drop', type=flags.miou_drop, default=0.005,
                   help='largest mIoU loss against the FP32 export on the same engine')
    p.add_argument('--backend', nargs='+', choices=BACKEND_NAMES, default=None,
                   help='engines to consider (default: every installed one)')
    p.add_argument('--max_qat_iters', type=flags.positive_int, default=1000,
                   help='QAT budget; QAT stops at the first quarter that meets the bound')
    p.add_argument('--num_images', type=flags.positive_int, default=None,
                   help='val images each check runs on (default: all)')
    p.add_argument('--calib_images', type=flags.positive_int, default=CALIBRATION_IMAGES,
                   help='train images that calibrate PTQ')
    p.add_argument('--input_shape', nargs=4, type=flags.positive_int, default=None,
                   metavar=('N', 'C', 'H', 'W'),
                   help='timing input (as benchmark.py; default --export_shape, else '
                        + ' '.join(map(str, TIMING_SHAPE)) + ')')
    flags.add_export_shape(p)
    p.add_argument('--cpu_threads', '--threads', dest='cpu_threads', type=flags.positive_int,
                   default=EngineOptions.cpu_threads, help='CPU threads of every engine')
    p.add_argument('--resume', action='store_true',
                   help='continue a killed run in --save_dir at its last finished step')
    return p, lazy('segslim.cli.workflows', 'run_auto_quant')


@register
def infer() -> Tuple[argparse.ArgumentParser, Main]:
    p = flags.ArgumentParser(description='Segment images with an exported model.')
    p.add_argument('--config', required=True, help='deploy.yaml (or its folder)')
    p.add_argument('--image_path', required=True,
                   help='an image, a folder (searched recursively) or a file list (first '
                        'column of each line, relative to the list\'s folder)')
    p.add_argument('--save_dir', default='./output',
                   help='masks go here, sub-folders of --image_path kept')
    p.add_argument('--batch_size', type=flags.positive_int, default=1)
    p.add_argument('--overlay', action='store_true', help='also write image+mask overlays')
    p.add_argument('--with_argmax', action='store_true',
                   help='accepted for compatibility: masks are always class ids, whatever '
                        'head the model was exported with')
    p.add_argument('--model_name', default='', help='named in the --benchmark summary')
    p.add_argument('--debug', action='store_true', help='show tracebacks')
    flags.add_engine_args(p)
    return p, lazy('segslim.cli.deploy_workflows', 'run_infer')


@register
def benchmark() -> Tuple[argparse.ArgumentParser, Main]:
    p = make_parser('FP32 vs INT8 on the deployed engine: mIoU, latency, agreement, INT8 ops.',
                config_required=False)
    p.add_argument('--model_dirs', nargs='+', required=True,
                   help='exported model folders; the first is the baseline')
    p.add_argument('--input_shape', nargs=4, type=flags.positive_int, default=list(TIMING_SHAPE),
                   metavar=('N', 'C', 'H', 'W'), help='timing input')
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--repeats', type=flags.positive_int, default=20)
    p.add_argument('--no_bf16', action='store_true', help='skip the bf16 baseline row')
    p.add_argument('--no_ceiling', action='store_true',
                   help='skip the CPU ceiling probe that every INT8 row is measured against '
                        '(compute-bound convolutions FP32 vs INT8 and bf16 on each engine, timed '
                        'in the same turns as the rows: about 0.3 s more per engine and turn)')
    p.add_argument('--peers', action='store_true',
                   help='also time the engines\' own quantizers on the first (FP32) folder, '
                        'each as its documentation shows it (NNCF on OpenVINO, onnxruntime '
                        'quantize_static, PaddleSlim quant_post_static on Paddle Inference), '
                        'calibrated on the train images our PTQ uses; written to '
                        '<report_dir>/peers')
    p.add_argument('--calib_images', type=flags.positive_int, default=CALIBRATION_IMAGES,
                   help='train images that calibrate the peers (--peers)')
    p.add_argument('--json', default=None, help='write the report as JSON')
    p.add_argument('--markdown', default=None, help='write the report to a markdown file')
    p.add_argument('--report_dir', default=None,
                   help='write report.md with latency.png, miou.png and gallery/ (where INT8 '
                        'differs from FP32, in pictures) here')
    p.add_argument('--gallery', type=int, default=8,
                   help='val images in the gallery: those where INT8 agrees least with FP32')
    flags.add_engine_args(p, many_backends=True)
    return p, lazy('segslim.cli.deploy_workflows', 'run_benchmark')
