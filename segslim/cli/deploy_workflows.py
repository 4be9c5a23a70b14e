"""What the deploy scripts do (deploy/python/infer.py and benchmark.py), behind their
parsers in segslim.cli.commands: engines on exported model folders, no training."""
import argparse
import os
import tempfile
from typing import Dict, Optional

from segslim._paddle import set_device
from segslim.builder import build_dataset
from segslim.config import load_config
from segslim.errors import UserError
from segslim.fileio import check_output_file, check_writable, write_json, write_text
from segslim.logger import logger
from segslim.options import EngineOptions


def run_infer(args: argparse.Namespace) -> int:
    """deploy/python/infer.py: masks for image files."""
    from segslim.deploy.engines import create_predictor
    from segslim.deploy.infer import STAGES, list_images, predict_images
    from segslim.modeldir import Preprocessor, read_deploy
    images = list_images(args.image_path)
    # the engine's load-time choices (INT8 per kind of layer) are timed at the input it
    # will run: the first batch's shape after the deploy transforms
    first, _ = Preprocessor(read_deploy(args.config)['transforms'])(images[0][0])
    predictor = create_predictor(args.config, EngineOptions.from_args(
        args, device=set_device(args.device),
        input_shape=(min(args.batch_size, len(images)), *first.shape)))
    if predictor.fallback:
        logger.warning(predictor.fallback)
    if predictor.precision != 'int8' and predictor.quantized:
        logger.warning('%s is quantized but this engine has no INT8 kernels for it: it runs '
                       '%s (use oneDNN on CPU, or TensorRT on GPU)', args.config,
                       predictor.precision.label)
    timings: Optional[Dict[str, list]] = None
    if args.benchmark:  # warm up on the first batch, as PaddleSeg's infer.py does
        predict_images(predictor, images[:args.batch_size], args.save_dir, args.batch_size)
        timings = {}
    written = predict_images(predictor, images, args.save_dir, args.batch_size, args.overlay,
                             timings)
    if timings:
        n = len(images)
        logger.info('[benchmark] model: %s, engine: %s, precision: %s, device: %s, '
                    'batch_size: %d, images: %d', args.model_name or predictor.model_dir,
                    predictor.backend, predictor.precision, predictor.opts.device,
                    args.batch_size, n)
        logger.info('[benchmark] per image: %s, total %.2f ms', ', '.join(
            f'{stage} {1000 * sum(timings[stage]) / n:.2f} ms' for stage in STAGES),
            1000 * sum(sum(timings[stage]) for stage in STAGES) / n)
    logger.info('Wrote %d masks to %s', len(written), args.save_dir)
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    """deploy/python/benchmark.py: the FP32-vs-INT8 report (table, JSON, pictures)."""
    from segslim.deploy import benchmark as bench
    from segslim.deploy.report import GalleryPick, format_report, write_report_dir
    check_output_file(args.json, '--json')
    check_output_file(args.markdown, '--markdown')
    if args.report_dir:
        check_writable(args.report_dir, '--report_dir')
    dataset, cfg = None, None
    if args.config:
        cfg = load_config(args.config, opts=args.opts, required=(
            'val_dataset', *(['train_dataset'] if args.peers else [])))
        dataset = build_dataset(cfg, 'val_dataset')
    elif args.peers:
        raise UserError('--peers needs --config: its train images calibrate the peer quantizers')
    pick = GalleryPick(args.gallery) if args.report_dir else None
    opts = EngineOptions.from_args(args, device=set_device(args.device))
    backends = list(dict.fromkeys(args.backend))
    with tempfile.TemporaryDirectory(prefix='segslim-peers-') as tmp:
        model_dirs = list(args.model_dirs)
        if args.peers and cfg is not None:
            from segslim.bench.peers import peers_of
            model_dirs += peers_of(args.model_dirs[0], cfg, os.path.join(
                args.report_dir, 'peers') if args.report_dir else tmp, backends,
                args.calib_images)
        probe = None
        if not args.no_ceiling and opts.device == 'cpu':  # timed in the rows' turns
            from segslim.bench.ceiling import CeilingProbe
            from segslim.deploy.cpu import cpu_features
            probe = CeilingProbe(os.path.join(tmp, 'ceiling'), backends, opts,
                                 bf16=not args.no_bf16 and bool(cpu_features()['bf16']))
        report = bench.benchmark(model_dirs, dataset, opts, shape=args.input_shape,
                                 warmup=args.warmup, repeats=args.repeats,
                                 with_bf16=False if args.no_bf16 else None,
                                 backends=backends, gallery=pick,
                                 companions=probe.companions if probe else ())
    if probe is not None:
        from segslim.bench.ceiling import apply_ceilings
        apply_ceilings(report, probe.ceilings())
    text = format_report(report)
    print(text, flush=True)
    if args.markdown:
        write_text(args.markdown, text + '\n')
    if args.report_dir:
        path = write_report_dir(report, args.report_dir, dataset, pick)
        logger.info('Report with charts and the INT8-vs-FP32 gallery: %s', path)
    if args.json:
        write_json(args.json, report.to_json())
    return 0
