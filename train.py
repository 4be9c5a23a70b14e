"""Train a PaddleSeg model in FP32: python train.py --config <yml> [--do_eval] ..."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from segslim import cli  # noqa: E402


def build_parser():
    p = cli.add_train_args(cli.base_parser('Train a segmentation model (FP32).'))
    p.add_argument('--precision', choices=['fp32', 'fp16'], default='fp32',
                   help='fp16 enables automatic mixed precision (GPU only)')
    p.add_argument('--amp_level', choices=['O1', 'O2'], default='O1', help='AMP level')
    p.add_argument('--use_ema', action='store_true', help='accepted for compatibility; unused')
    return p


def main(args):
    from segslim.workflows import run_train
    return run_train(args)


if __name__ == '__main__':
    cli.entry(build_parser, main)
