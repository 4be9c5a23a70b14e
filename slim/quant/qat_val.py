"""Evaluate QAT weights: python slim/quant/qat_val.py --config <yml> --model_path ..."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim import cli  # noqa: E402


def build_parser():
    return cli.add_eval_args(cli.base_parser('Evaluate a quantization-aware trained model.'))


def main(args):
    from segslim.workflows import run_val
    return run_val(args, quant=True)


if __name__ == '__main__':
    cli.entry(build_parser, main)
