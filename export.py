"""Export FP32 weights for Paddle Inference: python export.py --config <yml> --model_path ..."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.export()
