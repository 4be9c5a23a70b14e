"""The commands of tools/: generated data, the zoo benchmark and the comparison of every
quantization method on one trained model. Registered beside the scripts' commands
(segslim.cli.commands), so a step can run any of them in a child process."""
import argparse
import os
from typing import Optional, Tuple

from segslim.cli import flags
from segslim.cli.commands import Main, make_parser, register, run_step
from segslim.deploy.engines import BACKEND_NAMES
from segslim.errors import UserError
from segslim.options import CALIBRATION_IMAGES, EngineOptions


@register
def make_demo_dataset() -> Tuple[argparse.ArgumentParser, Main]:
    p = flags.ArgumentParser(description='Generate deterministic demo optic-disc data.')
    p.add_argument('--save_dir', default='data/optic_disc_seg')
    p.add_argument('--num_train', type=int, default=60)
    p.add_argument('--num_val', type=int, default=20)
    p.add_argument('--num_test', type=int, default=10)
    p.add_argument('--size', type=int, default=128, help='image side in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--debug', action='store_true', help='show tracebacks')

    def main(args):
        from segslim.data.demo import make_demo_dataset as make
        if min(args.num_train, args.num_val, args.size) <= 0 or args.num_test < 0:
            raise UserError('--num_train, --num_val and --size must be positive')
        make(args.save_dir, args.num_train, args.num_val, args.num_test, args.size, args.seed)
        print(f'wrote {args.num_train} train / {args.num_val} val / {args.num_test} test images '
              f'of {args.size}x{args.size} to {args.save_dir}')
    return p, main


@register
def make_street_dataset() -> Tuple[argparse.ArgumentParser, Main]:
    p = flags.ArgumentParser(description='Generate synthetic street scenes with the 19 Cityscapes '
                             'train classes in the Cityscapes layout (deterministic for a seed).')
    p.add_argument('--save_dir', default='data/street')
    p.add_argument('--num_train', type=flags.positive_int, default=400)
    p.add_argument('--num_val', type=flags.positive_int, default=100)
    p.add_argument('--width', type=flags.positive_int, default=256)
    p.add_argument('--height', type=flags.positive_int, default=128)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--debug', action='store_true', help='show tracebacks')

    def main(args):
        from segslim.data.street import make_street_dataset as make
        make(args.save_dir, args.num_train, args.num_val, args.width, args.height, args.seed)
        print(f'wrote {args.num_train} train / {args.num_val} val street scenes of '
              f'{args.width}x{args.height} (seed {args.seed}) to {args.save_dir}')
    return p, main


@register
def bench_models() -> Tuple[argparse.ArgumentParser, Main]:
    p = flags.ArgumentParser(description='Latency FP32 vs bf16 vs INT8 of model configs on '
                                'random weights; writes a markdown report and its JSON.')
    p.add_argument('--configs', nargs='+', default=None,
                   help='default: every model config under configs/ (the zoo)')
    p.add_argument('--cpu_threads', '--threads', dest='cpu_threads', type=flags.positive_int,
                   default=EngineOptions.cpu_threads)
    p.add_argument('--size', type=flags.positive_int, default=512,
                   help='input side (the ResNet50 OS8 Cityscapes models run 1024x512)')
    p.add_argument('--repeats', type=flags.positive_int, default=20)
    p.add_argument('--out', default='docs/benchmark.md',
                   help='the markdown report; its JSON is written beside it, and while the run '
                        'lasts each finished model is kept in <out without .md>.parts, so a '
                        'rerun after a kill goes on from there')
    p.add_argument('--backend', nargs='+', choices=BACKEND_NAMES, default=['paddle'],
                   help='engines to time (openvino: pip install -e .[openvino])')
    p.add_argument('--no_peers', action='store_true',
                   help='skip the engines\' own quantizers (NNCF, onnxruntime quantize_static, '
                        'PaddleSlim quant_post_static) timed beside ours')
    p.add_argument('--debug', action='store_true', help='show tracebacks')

    def main(args):
        from segslim.bench.models import bench_models as run
        from segslim.bench.models import zoo_configs
        from segslim.bench.parts import clear_parts
        from segslim.bench.zoo_report import write_report
        configs = args.configs or zoo_configs()
        parts = os.path.splitext(args.out)[0] + '.parts' if args.out else None
        write_report(run(configs, args.cpu_threads, args.size, args.repeats,
                         backends=list(dict.fromkeys(args.backend)),
                         peers=not args.no_peers, parts_dir=parts), args.out)
        clear_parts(parts)
    return p, main


@register
def compare_methods() -> Tuple[argparse.ArgumentParser, Main]:
    from segslim.bench.compare import METHOD_NAMES, STREET_SHAPE
    p = make_parser('Every quantization method (PTQ with each activation algorithm, '
                    'reconstruction PTQ, QAT with and without distillation, auto-quant) and '
                    'the engines\' own quantizers on one trained model: mIoU, thin classes, '
                    'agreement and time to quantize on every engine (compare.md).')
    p.add_argument('--model_path', required=True, help='trained FP32 model.pdparams')
    p.add_argument('--save_dir', default='output/compare',
                   help='a folder per method, times.json, report.json and compare.md; a '
                        'method already finished there is kept')
    p.add_argument('--methods', nargs='+', choices=METHOD_NAMES, default=list(METHOD_NAMES))
    p.add_argument('--no_peers', dest='peers', action='store_false',
                   help='leave out NNCF, onnxruntime quantize_static and PaddleSlim '
                        'quant_post_static')
    p.add_argument('--qat_iters', type=flags.positive_int, default=200,
                   help='iterations of QAT, QAT --distill and auto-quant\'s QAT budget')
    p.add_argument('--max_miou_drop', type=flags.miou_drop, default=0.005,
                   help='auto-quant\'s bound')
    p.add_argument('--thin', nargs='*', default=None,
                   help='classes reported on their own (default for a 19-class model: fence, '
                        'pole, traffic light, traffic sign, bicycle)')
    p.add_argument('--backend', nargs='+', choices=BACKEND_NAMES, default=None,
                   help='engines (default: every installed one)')
    p.add_argument('--calib_images', type=flags.positive_int, default=CALIBRATION_IMAGES,
                   help='train images that calibrate every PTQ and the peers')
    p.add_argument('--cpu_threads', '--threads', dest='cpu_threads', type=flags.positive_int,
                   default=EngineOptions.cpu_threads)
    p.add_argument('--input_shape', nargs=4, type=flags.positive_int, default=None,
                   metavar=('N', 'C', 'H', 'W'),
                   help='timing input (default --export_shape, else '
                        + ' '.join(map(str, STREET_SHAPE)) + ')')
    flags.add_export_shape(p)
    p.add_argument('--repeats', type=flags.positive_int, default=5)
    return p, _compare


def _compare(args: argparse.Namespace) -> Optional[int]:
    from segslim.bench.compare import run_compare
    return run_compare(args, run_step)
