"""Export FP32 weights for Paddle Inference: python export.py --config <yml> --model_path ..."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from segslim import cli  # noqa: E402


def build_parser():
    return cli.add_export_args(cli.base_parser('Export an FP32 inference model.'))


def main(args):
    from segslim.workflows import run_export
    return run_export(args)


if __name__ == '__main__':
    cli.entry(build_parser, main)
