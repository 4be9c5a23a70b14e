"""Write a deterministic fundus-like dataset in the optic-disc layout:
python tools/make_demo_dataset.py --save_dir data/optic_disc_seg"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from segslim import cli  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description='Generate demo optic-disc data.')
    p.add_argument('--save_dir', default='data/optic_disc_seg')
    p.add_argument('--num_train', type=int, default=60)
    p.add_argument('--num_val', type=int, default=20)
    p.add_argument('--num_test', type=int, default=10)
    p.add_argument('--size', type=int, default=128, help='image side in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--debug', action='store_true')
    return p


def main(args):
    from segslim.data.demo import make_demo_dataset
    make_demo_dataset(args.save_dir, args.num_train, args.num_val, args.num_test, args.size,
                      args.seed)
    print('wrote {} train / {} val / {} test images of {}x{} to {}'.format(
        args.num_train, args.num_val, args.num_test, args.size, args.size, args.save_dir))


if __name__ == '__main__':
    cli.entry(build_parser, main)
