"""Latency FP32 vs INT8 (and bf16) at 512x512 for the shipped configs -> docs/benchmark.md:
python tools/bench_models.py --out docs/benchmark.md"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from segslim import cli  # noqa: E402

CONFIGS = ['configs/quick_start/bisenet_optic_disc_512x512_1k.yml',
           'configs/quick_start/pp_liteseg_optic_disc_512x512_1k.yml',
           'configs/quick_start/deeplabv3p_resnet18_optic_disc_512x512_1k.yml']


def main(args):
    from segslim.deploy.model_bench import bench_models, format_markdown
    reports = bench_models(args.configs, args.cpu_threads, args.size, args.repeats)
    text = format_markdown(reports)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
            json.dump(reports, f, indent=2)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--configs', nargs='+', default=CONFIGS)
    p.add_argument('--cpu_threads', type=int, default=2)
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--out', default='docs/benchmark.md')
    p.add_argument('--debug', action='store_true')
    cli.entry(p, main)
