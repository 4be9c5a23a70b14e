"""Quantization-aware training from FP32 weights:
python slim/quant/qat_train.py --config <yml> --model_path output_fp32/best_model/model.pdparams"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim import cli  # noqa: E402


def build_parser():
    p = cli.add_train_args(cli.base_parser('Quantization-aware training (PaddleSlim QAT).'))
    p.add_argument('--model_path', required=True, help='FP32 model.pdparams to start from')
    p.add_argument('--allow_partial', action='store_true',
                   help='load FP32 weights even if some keys are missing or mismatched')
    return p


def main(args):
    from segslim.workflows import run_train
    return run_train(args, quant=True)


if __name__ == '__main__':
    cli.entry(build_parser, main)
