"""Export QAT weights as an INT8 inference model:
python slim/quant/qat_export.py --config <yml> --model_path ... --save_dir output_quant_infer"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.qat_export()
