"""Evaluate QAT weights: python slim/quant/qat_val.py --config <yml> --model_path ..."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.qat_val()
