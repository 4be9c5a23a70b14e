"""Quantization-aware training from FP32 weights:
python slim/quant/qat_train.py --config <yml> --model_path output_fp32/best_model/model.pdparams"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.qat_train()
