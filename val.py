"""Evaluate FP32 weights: python val.py --config <yml> --model_path model.pdparams"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from segslim import cli  # noqa: E402


def build_parser():
    return cli.add_eval_args(cli.base_parser('Evaluate a segmentation model (FP32).'))


def main(args):
    from segslim.workflows import run_val
    return run_val(args)


if __name__ == '__main__':
    cli.entry(build_parser, main)
