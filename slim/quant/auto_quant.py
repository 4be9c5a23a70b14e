"""From FP32 weights to the fastest INT8 model that keeps its mIoU on the engine:
python slim/quant/auto_quant.py --config <yml> --model_path <fp32 .pdparams> --save_dir DIR
    --max_miou_drop 0.005 [--backend paddle openvino onnxruntime] [--resume]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

from segslim.cli import commands  # noqa: E402

if __name__ == '__main__':
    commands.auto_quant()
