"""Post-training quantization of an FP32 model:
python slim/quant/ptq.py --config <yml> --model_path <fp32 .pdparams> --save_dir DIR
    --batch_nums N --algo hist
(or --model_dir <FP32 inference model> instead of --model_path)"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.ptq()
