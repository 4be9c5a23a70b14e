"""Latency FP32 vs bf16 vs INT8 at 512x512 for the shipped configs -> docs/benchmark.md:
python tools/bench_models.py --out docs/benchmark.md"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from segslim.cli import tools  # noqa: E402

if __name__ == '__main__':
    tools.bench_models()
