"""Write deterministic fundus-like data in the optic-disc layout:
python tools/make_demo_dataset.py --save_dir data/optic_disc_seg"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from segslim.cli import tools  # noqa: E402

if __name__ == '__main__':
    tools.make_demo_dataset()
