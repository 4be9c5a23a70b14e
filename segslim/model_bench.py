"""Latency of FP32 vs INT8 for the shipped model configs on random-init weights.

Speed does not depend on trained weights, so each model is built from its config, exported
as FP32, quantized with activation scales calibrated on a few generated images, exported as
INT8, and timed through Paddle Inference in one process, interleaved.
"""
import os
import tempfile
from typing import Any, Dict, List, Sequence

import numpy as np

from segslim._paddle import paddle
from segslim import builder
from segslim.config import load_config
from segslim.data.demo import make_sample
from segslim.deploy.benchmark import benchmark, format_report
from segslim.deploy.predictor import EngineOptions
from segslim.export import export_inference_model
from segslim.fileio import write_json, write_text
from segslim.logger import logger
from segslim.quant import quant_config_of, quantize_model


def calibration_batches(size: int, count: int, seed: int = 0) -> List[np.ndarray]:
    """Normalized fundus-like images, N=1, as a stand-in for real calibration data."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img, _ = make_sample(rng, size)
        x = (img[..., ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5
        out.append(np.transpose(x, (2, 0, 1))[np.newaxis].copy())
    return out


def export_pair(config: str, work_dir: str, size: int, calib: int = 4,
                layers: str = 'all') -> Dict[str, str]:
    """FP32 and INT8 exports of the config's model with random weights."""
    cfg = load_config(config, opts=['quant_config.layers={}'.format(layers)])
    paddle.seed(0)
    model = builder.build_model(cfg)
    model.eval()
    dirs = {'fp32': os.path.join(work_dir, 'fp32'), 'int8': os.path.join(work_dir, 'int8')}
    export_inference_model(model, cfg, dirs['fp32'], output_op='argmax')
    quanter = quantize_model(model, quant_config_of(cfg))
    # Fake-quant layers record moving-average activation scales in train mode; BN keeps
    # its statistics frozen so the INT8 model matches the FP32 one.
    model.train()
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase):
            layer.eval()
    with paddle.no_grad():
        for x in calibration_batches(size, calib):
            model(paddle.to_tensor(x))
    model.eval()
    export_inference_model(model, cfg, dirs['int8'], output_op='argmax', quanter=quanter)
    return dirs


def bench_models(configs: Sequence[str], threads: int = 2, size: int = 512,
                 repeats: int = 30, warmup: int = 5) -> List[Dict[str, Any]]:
    """One benchmark report per config (rows fp32, bf16 where supported, int8)."""
    reports = []
    for config in configs:
        name = os.path.splitext(os.path.basename(config))[0]
        with tempfile.TemporaryDirectory(prefix='segslim-bench-') as work:
            logger.info('Benchmarking %s at %dx%d, %d threads', name, size, size, threads)
            dirs = export_pair(config, work, size)
            report = benchmark([dirs['fp32'], dirs['int8']], None,
                               EngineOptions(device='cpu', cpu_threads=threads),
                               shape=(1, 3, size, size), warmup=warmup, repeats=repeats)
            report['config'] = config
            report['model'] = name
            reports.append(report)
    return reports


def format_markdown(reports: List[Dict[str, Any]]) -> str:
    """docs/benchmark.md: what was measured how, then one report table per model."""
    first = reports[0]
    lines = ['# Latency: FP32 vs INT8 on Paddle Inference', '',
             'Written by `make bench` (`tools/bench_models.py`). CPU: {} ({}), {} threads, '
             'input 1x3x{}x{}, batch 1; median and p90 of {} runs after {} warm-up runs, the '
             'three engines of a model interleaved in one process. Weights are random '
             '(latency does not depend on them); INT8 activation scales come from a few '
             'generated images; every Conv2D is quantized (`quant_config.layers: all`). '
             'Exported programs have the conv-bias rewrite, so oneDNN fuses conv + bias + BN '
             '+ activation in FP32, bf16 and INT8 alike. mIoU of trained models is in the '
             'demo report (`make demo`).'.format(
                 first['cpu'], first['isa'], first['threads'], first['input_shape'][2],
                 first['input_shape'][3], first['repeats'], first['warmup'])]
    for rep in reports:
        lines += ['', '## ' + rep['model'], '', format_report(rep, name=rep['model'])]
    return '\n'.join(lines) + '\n'


def write_report(reports: List[Dict[str, Any]], out: str) -> None:
    """Prints the markdown and writes it to `out`, with the raw numbers beside it as JSON."""
    text = format_markdown(reports)
    print(text, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_text(out, text)
        write_json(os.path.splitext(out)[0] + '.json', reports)
