"""Latency of FP32 vs INT8 for the shipped model configs on random-init weights.

Speed does not depend on trained weights, so each model is built from its config, exported
as FP32, quantized with activation scales calibrated on a few generated images, exported as
INT8, and timed through Paddle Inference (and OpenVINO when asked) in one process,
interleaved.
"""
import glob
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np

from segslim import builder
from segslim._paddle import paddle
from segslim.bench.ceiling import CeilingProbe, apply_ceilings, ceiling_probe
from segslim.bench.parts import load_part, save_part
from segslim.bench.peers import make_peers
from segslim.bench.zoo_report import ZooResult
from segslim.config import Yaml, load_config
from segslim.data.demo import make_sample
from segslim.deploy.bench_report import BenchReport
from segslim.deploy.benchmark import benchmark
from segslim.deploy.cpu import cpu_features
from segslim.deploy.profile import GainProfile, attainable_gain, profile_engine, profile_row
from segslim.errors import UserError
from segslim.export import export_inference_model
from segslim.logger import logger, progress
from segslim.modeldir import Preprocessor, deploy_transforms, model_inputs, read_deploy
from segslim.onnx.export import export_onnx
from segslim.options import EngineOptions
from segslim.quant.qat import calibrate, quant_config_of, quantize_model


def sample_images(size: int, count: int, seed: int = 0) -> List[np.ndarray]:
    """Generated fundus-like BGR images, a stand-in for real calibration data."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size)[0] for _ in range(count)]


def calibration_batches(cfg: Yaml, size: int, count: int,
                        seed: int = 0) -> List[np.ndarray]:
    """sample_images through the config's deploy transforms, N=1."""
    pre = Preprocessor(deploy_transforms(cfg))
    return [pre(image)[0][np.newaxis] for image in sample_images(size, count, seed)]


def export_pair(config: str, work_dir: str, size: int, calib: int = 4,
                layers: Optional[str] = 'all', fp32: bool = True,
                input_shape: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """FP32 (unless not `fp32`) and INT8 exports of the config's model with random weights;
    `layers` overrides the config's quant_config.layers (None: the config's own policy)."""
    opts = [f'quant_config.layers={layers}'] if layers else []
    cfg = load_config(config, opts=opts, required=('model',))
    paddle.seed(0)
    model = builder.build_model(cfg)
    model.eval()
    dirs = {'fp32': os.path.join(work_dir, 'fp32'), 'int8': os.path.join(work_dir, 'int8')}
    if fp32:
        export_inference_model(model, cfg, dirs['fp32'], output_op='argmax',
                               input_shape=input_shape)
    qcfg = quant_config_of(cfg)
    quanter = quantize_model(model, qcfg, summary=False)
    calibrate(model, calibration_batches(cfg, size, calib))
    export_inference_model(model, cfg, dirs['int8'], output_op='argmax', quanter=quanter,
                           int8_ops=qcfg['int8_ops'], input_shape=input_shape)
    return dirs


# Generated images that calibrate every INT8 model of `make bench` (ours and the peers'), and
# those its rows' agreement with FP32 is measured on (random weights: no val set to score).
CALIB_IMAGES = 4
AGREEMENT_IMAGES = 4

# Runs of the gain table's per-node profiles, at least (medians: segslim.deploy.profile); a
# three-run profile of a 12 ms row once read 30 ms on a shared VM.
PROFILE_RUNS = 10

# PaddleSeg's published QAT table: ResNet50_vd OS8 models timed on Cityscapes 1024x512 crops.
CITYSCAPES_SEVEN = ('ANN', 'DANet', 'DeepLabV3P', 'DNLNet', 'EMANet', 'GCNet', 'PSPNet')


# Config folders that are not zoo models: bases, the optic-disc quick starts, and the street
# configs (zoo architectures again, trained on the generated street data: `make street`).
NOT_ZOO = ('_base_', 'quick_start', 'street')


def zoo_configs(root: str = 'configs') -> List[str]:
    """Every model config of the zoo (configs/<model>/*.yml), sorted."""
    return sorted(p for p in glob.glob(os.path.join(root, '*', '*.yml'))
                  if os.path.basename(os.path.dirname(p)) not in NOT_ZOO)


def bench_shape(cfg: Yaml, size: int) -> List[int]:
    """1x3x512x1024 for the Cityscapes seven (ResNet50_vd OS8), else 1x3xSIZExSIZE."""
    model = cfg['model']
    backbone = (model.get('backbone') or {}).get('type')
    if model['type'] in CITYSCAPES_SEVEN and backbone == 'ResNet50_vd':
        return [1, 3, 512, 1024]
    return [1, 3, size, size]


def bench_models(configs: Sequence[str], threads: int = 2, size: int = 512,
                 repeats: int = 20, warmup: int = 3,
                 backends: Sequence[str] = ('paddle',), peers: bool = True,
                 parts_dir: Optional[str] = None) -> List[ZooResult]:
    """One benchmark report per config (rows fp32, bf16 where supported, int8 on each
    backend), each model quantized with its config's own policy, and each measured against
    this CPU's ceiling (segslim.bench.ceiling: the probe timed in the model's own turns).
    With `peers`, the engines' own quantizers (segslim.bench.peers) quantize the same FP32
    export on the same generated calibration images and are timed in the same run; every
    row's agreement with the FP32 row is measured on other generated images. Each finished
    model is kept in `parts_dir` (segslim.bench.parts): a rerun after a kill takes it
    instead of measuring again."""
    reports = []
    cpu = cpu_features()
    settings = {'threads': threads, 'size': size, 'repeats': repeats, 'warmup': warmup,
                'backends': list(backends), 'peers': peers, 'cpu': cpu['model'],
                'isa': cpu['isa'],  # one model name covers CPUs of different ISAs
                'ceiling': 'in the model\'s turns'}
    with ceiling_probe(backends, EngineOptions(device='cpu', cpu_threads=threads),
                       bf16=bool(cpu['bf16'])) as probe:
        for config in progress(configs, 'Models'):
            name = os.path.splitext(os.path.basename(config))[0]
            measured_with = dict(settings, config=config)
            result = load_part(parts_dir, name, measured_with)
            if result is None:
                result = _bench_one(config, name, threads, size, repeats, warmup, backends,
                                    peers, probe)
                save_part(parts_dir, name, measured_with, result)
            reports.append(result)
    return reports


def _bench_one(config: str, name: str, threads: int, size: int, repeats: int, warmup: int,
               backends: Sequence[str], peers: bool, probe: CeilingProbe) -> ZooResult:
    shape = bench_shape(load_config(config, required=('model',)), size)
    with tempfile.TemporaryDirectory(prefix='segslim-bench-') as work:
        logger.info('Benchmarking %s at %dx%d, %d threads', name, shape[3], shape[2], threads)
        # at the timed size: paddle2onnx converts adaptive pooling only at a known size
        dirs = export_pair(config, work, shape[2], calib=CALIB_IMAGES, layers=None,
                           input_shape=shape)
        model_backends, failures = list(backends), []
        if 'onnxruntime' in backends:
            try:
                export_onnx(dirs['fp32'])
                export_onnx(dirs['int8'], 'onnxruntime', sample_images(shape[2], 4))
            except UserError as e:
                logger.warning('%s: %s; no onnxruntime rows', name, e)
                model_backends.remove('onnxruntime')
                failures.append(str(e))
        opts = EngineOptions(device='cpu', cpu_threads=threads, input_shape=tuple(shape))
        deploy = read_deploy(dirs['fp32'])
        peer_dirs = make_peers(dirs['fp32'], os.path.join(work, 'peers'), model_inputs(
            deploy, sample_images(shape[2], CALIB_IMAGES)), model_backends) if peers else []
        samples = model_inputs(deploy, sample_images(shape[2], AGREEMENT_IMAGES, seed=1))
        try:
            report = benchmark([dirs['fp32'], dirs['int8'], *peer_dirs], None, opts,
                               shape=shape, warmup=warmup, repeats=repeats,
                               backends=model_backends, sample_batches=samples,
                               companions=probe.companions)
        except UserError as e:  # one engine cannot run this model: time the others
            if len(model_backends) == 1:
                raise
            logger.warning('%s: %s; timing Paddle Inference only', name, e)
            report = benchmark([dirs['fp32'], dirs['int8'], *peer_dirs], None, opts,
                               shape=shape, warmup=warmup, repeats=repeats,
                               backends=('paddle',), sample_batches=samples,
                               companions=probe.companions)
            failures.append(str(e))
        apply_ceilings(report, probe.ceilings())
        result = ZooResult(model=name, config=config, report=report, engine_failures=failures)
        try:  # where the INT8 engine's time goes, in a child process
            result.int8_profile = profile_engine(dirs['int8'], 'int8', threads, shape,
                                                 max(3, repeats // 4))
        except RuntimeError as e:
            logger.warning('%s', e)
        result.gain_profile = gain_profile(report, threads, shape, max(PROFILE_RUNS, repeats))
    return result


def gain_profile(report: BenchReport, threads: int, shape: Sequence[int],
                 runs: int) -> Optional[GainProfile]:
    """Where the fastest INT8 row and the fastest unquantized row of `report` spend their
    time, and the gain the second allows against the probe's ceiling; None when there is
    no gain or one of the two engines has no profiler here."""
    gain = report.gain()
    if gain is None:
        return None
    try:
        int8 = profile_row(gain.best_int8, threads, shape, runs)
        unquantized = profile_row(gain.best_unquantized, threads, shape, runs)
    except RuntimeError as e:
        logger.warning('%s', e)
        return None
    if int8 is None or unquantized is None:
        return None
    ceiling = report.ceiling_gain
    return GainProfile(int8, unquantized,
                       attainable_gain(unquantized, ceiling) if ceiling else None)
