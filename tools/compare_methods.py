"""Every quantization method and the engines' own quantizers on one trained model, on every
engine: python tools/compare_methods.py --config <yml> --model_path <best_model/model.pdparams>
    --save_dir <folder>   (compare.md there; docs/accuracy.md shows it on the street models)"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from segslim.cli import tools  # noqa: E402

if __name__ == '__main__':
    tools.compare_methods()
