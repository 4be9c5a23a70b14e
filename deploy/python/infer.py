"""Segment images through Paddle Inference:
python deploy/python/infer.py --config output_quant_infer/deploy.yaml --image_path img.jpg"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.infer()
