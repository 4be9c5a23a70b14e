"""Train a PaddleSeg model in FP32: python train.py --config <yml> --do_eval"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.train()
