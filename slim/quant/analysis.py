"""Quantization sensitivity of each layer and a skip list for qat_train / qat_export / ptq:
python slim/quant/analysis.py --config <yml> --model_path <fp32 .pdparams> --save_dir DIR
    [--max_miou_drop 0.005]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.analysis()
