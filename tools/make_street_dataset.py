"""Write synthetic street scenes (19 Cityscapes classes) in the Cityscapes layout:
python tools/make_street_dataset.py --save_dir data/street [--num_train 400 --num_val 100]"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from segslim.cli import tools  # noqa: E402

if __name__ == '__main__':
    tools.make_street_dataset()
