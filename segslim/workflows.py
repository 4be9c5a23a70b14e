"""What each script does once its flags are parsed: train, evaluate, export, FP32 or QAT."""
import argparse
import logging
import os
import random
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from segslim._paddle import check_versions, paddle, set_device
from segslim import builder, cli
from segslim.config import EVAL_KEYS, EXPORT_KEYS, TRAIN_KEYS, load_config, save_config
from segslim.builder import build_dataset
from segslim.data.datasets import can_reach
from segslim.engine import checkpoint as ckpt
from segslim.engine import distributed
from segslim.engine.evaluate import evaluate
from segslim.engine.metrics import format_metrics
from segslim.engine.train import TrainOptions, restore_training, train
from segslim.errors import UserError
from segslim.export import export_inference_model, export_onnx, output_op_of
from segslim.fileio import write_json, write_text
from segslim.logger import logger
from segslim.quant import build_quant_model, quant_config_of, quantize_model


def _setup(args: argparse.Namespace, required: Sequence[str],
           training: bool = False) -> Dict[str, Any]:
    check_versions()
    if training:
        cfg = load_config(args.config, args.iters, args.batch_size, args.learning_rate,
                          args.opts, required=required)
    else:
        cfg = load_config(args.config, opts=args.opts, required=required)
    apply_data_format(cfg, getattr(args, 'data_format', 'NCHW'))
    args.device = set_device(args.device)
    return cfg


def apply_data_format(cfg: Dict[str, Any], data_format: str) -> None:
    """--data_format NHWC, as PaddleSeg 2.8 supports it: DeepLabV3P only, set on the model,
    its backbone and the losses; the loops transpose the NCHW batches."""
    if data_format == 'NCHW':
        return
    if cfg['model'].get('type') != 'DeepLabV3P':
        raise UserError('--data_format NHWC supports DeepLabV3P only (as PaddleSeg); config '
                        'model.type is {}'.format(cfg['model'].get('type')))
    cfg['model']['data_format'] = data_format
    if isinstance(cfg['model'].get('backbone'), dict):
        cfg['model']['backbone']['data_format'] = data_format
    for item in (cfg.get('loss') or {}).get('types') or []:
        if isinstance(item, dict):
            item['data_format'] = data_format


def _seed_everything(seed: int) -> None:
    paddle.seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def choose_seed(args: argparse.Namespace, resume: Optional[Dict[str, Any]]) -> int:
    """The run's seed: a resumed run keeps its checkpoint's; --seed otherwise; with neither
    (PaddleSeg's default) one is drawn and logged, and the checkpoints keep it."""
    if resume is not None:
        seed = int(resume['state'].get('seed', 0))
        if args.seed is not None and args.seed != seed:
            logger.warning('--seed %d ignored: the resumed run continues with its seed %d',
                           args.seed, seed)
        return seed
    if args.seed is not None:
        return args.seed
    seed = random.SystemRandom().randrange(2 ** 31)
    logger.info('No --seed given: using seed %d (pass --seed %d to repeat this run)', seed,
                seed)
    return seed


def check_writable(save_dir: str, flag: str = '--save_dir') -> None:
    """Fails early, creating nothing, when save_dir (or the folder it would be made in)
    cannot be written."""
    path = os.path.abspath(save_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError('{} {} is a file; choose a folder'.format(flag, save_dir))
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError('{} {} is not writable ({} is {}); choose another folder'.format(
            flag, save_dir, parent, 'a file' if not os.path.isdir(parent) else 'read-only'))


def local_weights(location: str, key: str) -> str:
    """A local file for a weights path or URL. URLs go through paddleseg's downloader, which
    caches each under a folder named after the URL."""
    if not str(location).startswith(('http://', 'https://')):
        return location
    host = str(location).split('/')[2]
    if not can_reach((host, 443)):
        raise UserError('config key `{}`: {} cannot be downloaded (no network); fetch it '
                        'elsewhere and set the key to the local file'.format(key, location))
    from paddleseg.utils import download_pretrained_model
    return download_pretrained_model(location)


def check_output_file(path: Optional[str], flag: str) -> None:
    """Fails early, before any work, when an output file like --json cannot be written."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError('{} {} is a folder; give a file name'.format(flag, path))
    if not os.path.isdir(folder):
        raise UserError('{} {}: folder {} does not exist; create it or choose another '
                        'path'.format(flag, path, folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError('{} {}: folder {} is read-only; choose another path'.format(
            flag, path, folder))


def load_pretrained(model: paddle.nn.Layer, cfg: Dict[str, Any]) -> bool:
    """Loads `model.pretrained` / `model.backbone.pretrained` into the matching sublayer,
    skipping unfit keys; returns whether anything was loaded."""
    found = builder.pretrained_paths(cfg)
    for sub, location in found:
        key = 'model.{}pretrained'.format(sub + '.' if sub else '')
        location = local_weights(location, key)
        target = getattr(model, sub) if sub else model
        report = ckpt.load_weights(target, location, allow_partial=True, flag=key)
        logger.info('Loaded %s from %s (%d missing, %d unexpected, %d mismatched keys skipped)',
                    key, location, len(report['missing']), len(report['unexpected']),
                    len(report['mismatched']))
    return bool(found)


def weights_path(args: argparse.Namespace, cfg: Dict[str, Any]) -> str:
    """--model_path, else the config's `model.pretrained` (PaddleSeg's fallback)."""
    if args.model_path:
        return args.model_path
    pretrained = cfg['model'].get('pretrained')
    if pretrained:
        logger.info('No --model_path: using model.pretrained %s of the config', pretrained)
        return local_weights(pretrained, 'model.pretrained')
    raise UserError('no weights to load: pass --model_path <model.pdparams> or set '
                    '`model.pretrained` in {}'.format(args.config))


def _build_train_model(args: argparse.Namespace, cfg: Dict[str, Any], quant: bool,
                       resume: Optional[Dict[str, Any]]):
    """The model to train, with its starting weights (none when resuming: the checkpoint
    brings them); for QAT, FP32 weights are loaded before quantizing."""
    model = builder.build_model(cfg)
    if resume is None:
        if quant and args.model_path:
            ckpt.load_weights(model, args.model_path,
                              allow_partial=getattr(args, 'allow_partial', False))
        else:
            loaded = load_pretrained(model, cfg)
            if quant:
                logger.warning('QAT normally starts from trained FP32 weights (--model_path '
                               'output_fp32/best_model/model.pdparams); starting from %s',
                               'the config\'s pretrained weights' if loaded else 'random init')
    if not quant:
        return model
    quantize_model(model, quant_config_of(cfg))
    return model


def run_train(args: argparse.Namespace, quant: bool = False) -> int:
    """train.py and qat_train.py: one loop; QAT only swaps in the quantized model."""
    required = TRAIN_KEYS + (('val_dataset',) if args.do_eval else ())
    cfg = _setup(args, required, training=True)
    processes = distributed.init()
    if processes > 1:
        if not distributed.is_main():  # one log, from the first process
            logger.setLevel(logging.WARNING)
        logger.info('data parallel: %d processes, --batch_size %d per process (%d per step)',
                    processes, cfg['batch_size'], cfg['batch_size'] * processes)
    resume = ckpt.load_checkpoint(args.resume_model) if args.resume_model else None
    seed = choose_seed(args, resume)
    _seed_everything(seed)
    check_writable(args.save_dir)
    model = _build_train_model(args, cfg, quant, resume)
    if processes > 1 and args.device == 'gpu':  # batch statistics over every card
        model = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_ds = build_dataset(cfg, 'train_dataset', seed=seed)
    val_ds = build_dataset(cfg, 'val_dataset') if args.do_eval else None
    scheduler = builder.build_lr_scheduler(cfg)
    optimizer = builder.build_optimizer(cfg, model, scheduler)
    losses = builder.build_loss(cfg)
    if resume is not None:
        restore_training(resume, model, optimizer, scheduler)
    # Written only once everything was built, so a setup error leaves save_dir untouched.
    try:
        if distributed.is_main():
            save_config(cfg, args.save_dir)
    except OSError as e:
        raise UserError('cannot write {} ({}); choose a writable --save_dir'.format(
            args.save_dir, e.strerror))
    opts = TrainOptions(
        save_dir=args.save_dir, iters=cfg['iters'], batch_size=cfg['batch_size'],
        do_eval=args.do_eval, use_vdl=args.use_vdl, save_interval=args.save_interval,
        log_iters=args.log_iters, keep_checkpoint_max=args.keep_checkpoint_max,
        num_workers=args.num_workers, seed=seed,
        precision=getattr(args, 'precision', 'fp32'),
        amp_level=getattr(args, 'amp_level', 'O1'), use_ema=getattr(args, 'use_ema', False),
        repeats=getattr(args, 'repeats', 1),
        profiler_options=getattr(args, 'profiler_options', None),
        eval_kwargs=cli.eval_kwargs(args, cfg))
    result = train(model, train_ds, val_ds, optimizer, scheduler, losses, cfg, opts,
                   resume=resume)
    best = os.path.join(args.save_dir, 'best_model')
    if result['best_iter'] > 0:
        logger.info('Training done at iter %d; best mIoU %.4f at iter %d, weights in %s',
                    result['iter'], result['best_miou'], result['best_iter'], best)
    else:
        logger.info('Training done at iter %d; last weights in %s (add --do_eval to keep the '
                    'best by mIoU)', result['iter'], best)
    return 0


def _load_for_inference(args: argparse.Namespace, cfg: Dict[str, Any], quant: bool):
    weights = weights_path(args, cfg)
    if quant:
        return build_quant_model(cfg, qat_weights=weights)
    model = builder.build_model(cfg)
    ckpt.load_weights(model, weights)
    return model, None


def run_val(args: argparse.Namespace, quant: bool = False) -> int:
    """val.py and qat_val.py: metrics of a checkpoint on the config's val set."""
    cfg = _setup(args, EVAL_KEYS)
    check_output_file(args.json, '--json')
    model, _ = _load_for_inference(args, cfg, quant)
    val_ds = build_dataset(cfg, 'val_dataset')
    logger.info('Evaluating on %d images', len(val_ds))
    metrics = evaluate(model, val_ds, log_every=max(len(val_ds) // 10, 10),
                       auc_roc=getattr(args, 'auc_roc', False), **cli.eval_kwargs(args, cfg))
    print(format_metrics(metrics, '[EVAL]'), flush=True)
    if args.json:
        write_json(args.json, metrics)
    return 0


def run_export(args: argparse.Namespace, quant: bool = False) -> int:
    """export.py and qat_export.py: an inference model with its deploy.yaml."""
    cfg = _setup(args, EXPORT_KEYS)
    check_writable(args.save_dir)
    model, quanter = _load_for_inference(args, cfg, quant)
    export_inference_model(model, cfg, args.save_dir,
                           output_op_of(args.output_op, args.with_softmax, args.without_argmax),
                           args.input_shape, quanter,
                           quant_config_of(cfg)['int8_ops'] if quant else None)
    if args.to_onnx:
        export_onnx(args.save_dir)
    if quant and getattr(args, 'verify_images', 0) > 0:
        verify_engine(model, cfg, args.save_dir, args.verify_images)
    return 0


def verify_engine(model: paddle.nn.Layer, cfg: Dict[str, Any], model_dir: str,
                  limit: int) -> float:
    """Runs the exported model in Paddle Inference (CPU, oneDNN INT8) on val images and logs
    how many pixels agree with the QAT model; warns below 99.9 %."""
    from segslim.deploy.benchmark import agreement_with_model
    from segslim.deploy.predictor import EngineOptions, Predictor
    if not cfg.get('val_dataset'):
        logger.info('Config has no val_dataset: the INT8 engine was not checked against the '
                    'QAT model')
        return float('nan')
    try:
        dataset = build_dataset(cfg, 'val_dataset')
    except UserError as e:
        logger.warning('Skipped checking the INT8 engine against the QAT model: %s', e)
        return float('nan')
    predictor = Predictor(model_dir, EngineOptions(device='cpu', precision='int8'))
    share = agreement_with_model(model, predictor, dataset, limit)
    n = min(limit, len(dataset))
    if predictor.fallback:
        logger.warning('INT8 engine: %s', predictor.fallback)
    summary = predictor.engine
    (logger.info if share >= 0.999 else logger.warning)(
        'INT8 engine (oneDNN, %s/%s convs INT8) agrees with the QAT model on %.4f%% of pixels '
        '(%d val images)', summary.get('int8_conv_ops'), summary.get('conv_ops'), 100 * share, n)
    return share


def run_ptq(args: argparse.Namespace) -> int:
    """slim/quant/ptq.py: post-training quantization of FP32 weights (--model_path) or of an
    FP32 export (--model_dir), calibrated on train images; the same layout as qat_export."""
    from segslim import ptq
    cfg = _setup(args, ('model', 'train_dataset'))
    check_writable(args.save_dir)
    qcfg = quant_config_of(cfg)
    train_ds = build_dataset(cfg, 'train_dataset')
    asked = args.batch_nums * args.batch_size
    paths = ptq.calibration_paths(train_ds.file_list, min(asked, len(train_ds)))
    ptq.warn_if_too_few(len(paths), asked, len(train_ds))
    with tempfile.TemporaryDirectory(prefix='segslim-ptq-') as tmp:
        if args.model_dir:
            fp32_dir = args.model_dir
            with paddle.utils.unique_name.guard():  # the names of a fresh export.py process
                model = builder.build_model(cfg)
        else:
            model = builder.build_model(cfg)
            ckpt.load_weights(model, weights_path(args, cfg))
            fp32_dir = os.path.join(tmp, 'fp32')
            export_inference_model(model, cfg, fp32_dir, output_op_of(
                args.output_op, args.with_softmax, args.without_argmax))
        skip = ptq.skipped_weights(model, qcfg, 'PTQ ({}, {})'.format(
            args.algo, '/'.join(qcfg['quantizable_layer_type'])))
        ptq.post_training_quantize(fp32_dir, args.save_dir, paths, qcfg, skip, args.algo,
                                   args.batch_size, args.device)
        if args.to_onnx:
            export_onnx(args.save_dir)
        if args.verify_images > 0:
            compare_engines(cfg, fp32_dir, args.save_dir, args.verify_images)
    return 0


def run_analysis(args: argparse.Namespace) -> int:
    """slim/quant/analysis.py: per-layer sensitivity, and with --max_miou_drop the smallest
    skip set whose PTQ model meets the budget on the engine."""
    from segslim import analysis, ptq
    from segslim.deploy.benchmark import predict_dataset, score
    from segslim.deploy.predictor import EngineOptions, Predictor, Preprocessor
    from segslim.export import deploy_transforms
    cfg = _setup(args, ('model', 'train_dataset', 'val_dataset'))
    check_writable(args.save_dir)
    qcfg = quant_config_of(cfg)
    weights = weights_path(args, cfg)

    def build():
        model = builder.build_model(cfg)
        ckpt.load_weights(model, weights)
        return model
    train_ds = build_dataset(cfg, 'train_dataset')
    val_ds = build_dataset(cfg, 'val_dataset')
    paths = ptq.calibration_paths(train_ds.file_list, min(args.calib_images, len(train_ds)))
    ptq.warn_if_too_few(len(paths), args.calib_images, len(train_ds))
    pre = Preprocessor(deploy_transforms(cfg))
    probe = analysis.SensitivityProbe(build, qcfg, [pre(p)[0][np.newaxis] for p in paths],
                                      val_ds, args.num_images)
    n = len(probe.samples)
    logger.info('Sensitivity of %d layers on %d val images (FP32 mIoU %.4f)', len(probe.used),
                n, probe.fp32_miou)
    ranking = probe.rank()
    steps = None
    if args.max_miou_drop is None:
        skip = [r.name for r in ranking
                if probe.fp32_miou - r.alone_miou >= analysis.DEFAULT_SKIP_DROP]
        note = ('Skip list: the layers whose quantization alone costs at least {:.1f} mIoU '
                'points in simulation; not checked on the engine (--max_miou_drop gives a '
                'checked set).'.format(100 * analysis.DEFAULT_SKIP_DROP))
    else:
        with tempfile.TemporaryDirectory(prefix='segslim-analysis-') as tmp:
            fp32 = build()
            export_inference_model(fp32, cfg, os.path.join(tmp, 'fp32'))
            base = score(predict_dataset(Predictor(os.path.join(tmp, 'fp32'), EngineOptions()),
                                         val_ds, n), val_ds)['miou']

            def verify(skip: List[str]) -> float:
                q = dict(qcfg, skip=list(qcfg['skip']) + skip)
                ptq.post_training_quantize(os.path.join(tmp, 'fp32'), os.path.join(tmp, 'int8'),
                                           paths, q, ptq.skipped_weights(fp32, q, '', False),
                                           args.algo, device=args.device)
                engine = Predictor(os.path.join(tmp, 'int8'), EngineOptions(precision='int8'))
                miou = score(predict_dataset(engine, val_ds, n), val_ds)['miou']
                logger.info('Engine check, %d layers kept FP32: INT8 mIoU %.4f vs FP32 %.4f',
                            len(skip), miou, base)
                return base - miou
            skip, steps = analysis.smallest_skip_set(probe, ranking, args.max_miou_drop,
                                                     verify)
        met = any(s['skip'] == len(skip) and s['engine_drop'] <= args.max_miou_drop
                  for s in steps)
        note = ('Skip list: the shortest prefix of the ranking whose PTQ ({}) model stays '
                'within {:.4f} mIoU of FP32 on the Paddle Inference engine ({} val images): '
                '{}.'.format(args.algo, args.max_miou_drop, n,
                             'met, {} layers kept FP32'.format(len(skip)) if met else
                             'NOT met by any set tried'))
        (logger.info if met else logger.warning)(note)
    paths_out = analysis.write_sensitivity(args.save_dir, probe, ranking, skip, args.config,
                                           qcfg['skip'], note, steps)
    logger.info('Wrote %s, %s and %s', paths_out['md'], paths_out['png'], paths_out['yml'])
    return 0


def compare_engines(cfg: Dict[str, Any], fp32_dir: str, int8_dir: str, limit: int) -> None:
    """Logs mIoU of the FP32 and INT8 Paddle Inference engines on the first `limit` val
    images and their pixel agreement; warns when INT8 loses more than 1 point."""
    from segslim.deploy.benchmark import agreement, predict_dataset, score
    from segslim.deploy.predictor import EngineOptions, Predictor
    if not cfg.get('val_dataset'):
        logger.info('Config has no val_dataset: the INT8 engine was not checked')
        return
    dataset = build_dataset(cfg, 'val_dataset')
    n = min(limit, len(dataset))
    fp32 = predict_dataset(Predictor(fp32_dir, EngineOptions()), dataset, n)
    int8_engine = Predictor(int8_dir, EngineOptions(precision='int8'))
    int8 = predict_dataset(int8_engine, dataset, n)
    m32, m8 = score(fp32, dataset)['miou'], score(int8, dataset)['miou']
    (logger.info if m8 >= m32 - 0.01 else logger.warning)(
        'INT8 engine (oneDNN, %s/%s convs INT8): mIoU %.4f vs FP32 engine %.4f on %d val '
        'images, %.4f%% of pixels agree', int8_engine.engine.get('int8_conv_ops'),
        int8_engine.engine.get('conv_ops'), m8, m32, n, 100 * agreement(int8, fp32))


def _engine_options(args: argparse.Namespace):
    from segslim.deploy.predictor import EngineOptions
    device = set_device(args.device)
    shape = tuple(getattr(args, 'input_shape', None) or (1, 3, 512, 512))
    backend = args.backend if isinstance(args.backend, str) else args.backend[0]
    return EngineOptions(device=device, backend=backend, precision=args.precision,
                         cpu_threads=args.cpu_threads,
                         enable_mkldnn=args.enable_mkldnn, use_trt=args.use_trt,
                         min_subgraph_size=args.min_subgraph_size,
                         enable_auto_tune=args.enable_auto_tune,
                         trt_shape_file=args.auto_tuned_shape_file, input_shape=shape,
                         print_detail=args.print_detail)


def run_infer(args: argparse.Namespace) -> int:
    """deploy/python/infer.py: masks for image files."""
    from segslim.deploy.infer import STAGES, list_images, predict_images
    from segslim.deploy.predictor import create_predictor
    images = list_images(args.image_path)
    predictor = create_predictor(args.config, _engine_options(args))
    if predictor.fallback:
        logger.warning(predictor.fallback)
    if predictor.precision != 'int8' and predictor.quantized:
        logger.warning('%s is quantized but this engine has no INT8 kernels for it: it runs '
                       '%s (use oneDNN on CPU, or TensorRT on GPU)', args.config,
                       predictor.precision)
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
            '{} {:.2f} ms'.format(stage, 1000 * sum(timings[stage]) / n) for stage in STAGES),
            1000 * sum(sum(timings[stage]) for stage in STAGES) / n)
    logger.info('Wrote %d masks to %s', len(written), args.save_dir)
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    """deploy/python/benchmark.py: the FP32-vs-INT8 report (table, JSON, pictures)."""
    from segslim.deploy import benchmark as bench
    from segslim.deploy.report import write_report_dir
    check_output_file(args.json, '--json')
    check_output_file(args.markdown, '--markdown')
    if args.report_dir:
        check_writable(args.report_dir, '--report_dir')
    dataset = None
    if args.config:
        cfg = load_config(args.config, opts=args.opts, required=('val_dataset',))
        dataset = build_dataset(cfg, 'val_dataset')
    predictions: List[list] = []
    report = bench.benchmark(args.model_dirs, dataset, _engine_options(args),
                             shape=args.input_shape, warmup=args.warmup, repeats=args.repeats,
                             with_bf16=False if args.no_bf16 else None,
                             backends=list(dict.fromkeys(args.backend)),
                             predictions=predictions if args.report_dir else None)
    text = bench.format_report(report)
    print(text, flush=True)
    if args.markdown:
        write_text(args.markdown, text + '\n')
    if args.report_dir:
        path = write_report_dir(report, args.report_dir, dataset, predictions, args.gallery)
        logger.info('Report with charts and the INT8-vs-FP32 gallery: %s', path)
    if args.json:
        write_json(args.json, report)
    return 0
