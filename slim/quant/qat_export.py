"""Export QAT weights as an INT8 inference model:
python slim/quant/qat_export.py --config <yml> --model_path ... --save_dir output_quant_infer"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim import cli  # noqa: E402


def build_parser():
    return cli.add_export_args(cli.base_parser('Export a QAT model as an INT8 inference model.'))


def main(args):
    from segslim.workflows import run_export
    return run_export(args, quant=True)


if __name__ == '__main__':
    cli.entry(build_parser, main)
