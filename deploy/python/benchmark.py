"""FP32 vs INT8 on the deployed engine (mIoU, latency, agreement, INT8 ops):
python deploy/python/benchmark.py --config <yml> --model_dirs FP32_DIR INT8_DIR"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.benchmark()
