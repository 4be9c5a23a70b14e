"""What each command does once its flags are parsed: set up (config, device, seed), build
what the command needs and hand it to the library. Nothing here computes: training lives
in engine/, quantization in quant/ptq/analysis, export in export/onnx_export, engines in
deploy/."""
import argparse
import contextlib
import logging
import os
import pickle
import random
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from segslim import builder
from segslim._paddle import check_versions, paddle, set_cpu_threads, set_device
from segslim.builder import build_dataset
from segslim.config import (
    EVAL_KEYS,
    EXPORT_KEYS,
    TRAIN_KEYS,
    Yaml,
    apply_data_format,
    load_config,
    save_config,
)
from segslim.errors import UserError
from segslim.export import export_inference_model, output_op_of
from segslim.fileio import check_output_file, check_writable, write_json
from segslim.logger import logger
from segslim.onnx.export import CALIBRATION_IMAGES, export_onnx, require_onnx_export
from segslim.options import ONNX_TARGETS, EvalOptions, Rounding, TrainOptions
from segslim.quant.observers import observers_without_copies
from segslim.quant.qat import build_quant_model, quant_config_of, quantize_model
from segslim.train import checkpoint as ckpt
from segslim.train import distributed
from segslim.train.channel_affine import conv_bias_in_batch_norm_kernel
from segslim.train.evaluate import evaluate
from segslim.train.local_job import choose_processes, run_local_job, under_launcher
from segslim.train.loop import restore_training, train
from segslim.train.metrics import format_metrics
from segslim.train.sync_batch_norm import convert_cpu_sync_batch_norm


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
    if args.device == 'cpu':
        args.cpu_threads = set_cpu_threads(getattr(args, 'cpu_threads', None))
    return cfg


def _seed_everything(seed: int) -> None:
    paddle.seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def choose_seed(args: argparse.Namespace, resume: Optional[ckpt.Resume]) -> int:
    """The run's seed: a resumed run keeps its checkpoint's; --seed otherwise; with neither
    (PaddleSeg's default) one is drawn and logged, and the checkpoints keep it."""
    if resume is not None:
        seed = int(resume.state.get('seed', 0))
        if args.seed is not None and args.seed != seed:
            logger.warning('--seed %d ignored: the resumed run continues with its seed %d',
                           args.seed, seed)
        return seed
    if args.seed is not None:
        return int(args.seed)
    seed = random.SystemRandom().randrange(2 ** 31)
    logger.info('No --seed given: using seed %d (pass --seed %d to repeat this run)', seed,
                seed)
    return seed


def _build_train_model(args: argparse.Namespace, cfg: Yaml, quant: bool,
                       resume: Optional[ckpt.Resume]) -> paddle.nn.Layer:
    """The model to train, with its starting weights (none when resuming: the checkpoint
    brings them); for QAT, FP32 weights are loaded before quantizing."""
    model = builder.build_model(cfg)
    if resume is None:
        if quant and args.model_path:
            ckpt.load_weights(model, args.model_path,
                              allow_partial=getattr(args, 'allow_partial', False))
        else:
            loaded = ckpt.load_pretrained(model, cfg)
            if quant:
                logger.warning('QAT normally starts from trained FP32 weights (--model_path '
                               'output_fp32/best_model/model.pdparams); starting from %s',
                               'the config\'s pretrained weights' if loaded else 'random init')
    if quant:
        quantize_model(model, quant_config_of(cfg), summary_dir=args.save_dir)
    return model


def _build_teacher(args: argparse.Namespace, cfg: Yaml) -> Optional[paddle.nn.Layer]:
    """qat_train --distill: the FP32 model of --model_path, frozen in eval mode."""
    if not getattr(args, 'distill', False):
        return None
    if not args.model_path:
        raise UserError('--distill learns from the FP32 model of --model_path; pass --model_path '
                        'output_fp32/best_model/model.pdparams')
    teacher = builder.build_model(cfg)
    ckpt.load_weights(teacher, args.model_path)
    logger.info('Distilling from %s (weight %g, temperature %g)', args.model_path,
                args.distill_weight, args.distill_temperature)
    return teacher


def run_train(args: argparse.Namespace, quant: bool = False) -> int:
    """train.py and qat_train.py: one loop; QAT only swaps in the quantized model."""
    required = TRAIN_KEYS + (('val_dataset',) if args.do_eval else ())
    cfg = _setup(args, required, training=True)
    resume = ckpt.load_checkpoint(args.resume_model) if args.resume_model else None
    if args.device == 'cpu' and not under_launcher():
        local = choose_processes(args.cpu_processes, args.cpu_threads, cfg['batch_size'])
        if local > 1:
            check_writable(args.save_dir)
            return _run_local_job(args, cfg, quant, local, choose_seed(args, resume))
    processes = distributed.init()
    if processes > 1:
        if not distributed.is_main():  # one log, from the first process
            logger.setLevel(logging.WARNING)
        logger.info('data parallel: %d processes, --batch_size %d per process (%d per step)',
                    processes, cfg['batch_size'], cfg['batch_size'] * processes)
    if args.device == 'cpu':  # results depend on it: a resumed run should keep the count
        logger.info('Training on CPU with %d thread%s (--cpu_threads)', args.cpu_threads,
                    '' if args.cpu_threads == 1 else 's')
    seed = choose_seed(args, resume)
    _seed_everything(seed)
    check_writable(args.save_dir)
    model = _build_train_model(args, cfg, quant, resume)
    teacher = _build_teacher(args, cfg)
    if processes > 1:  # batch statistics over every card or process
        model = (paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.device == 'gpu'
                 else convert_cpu_sync_batch_norm(model))
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
        raise UserError(f'cannot write {args.save_dir} ({e.strerror}); choose a writable '
                        '--save_dir') from e
    opts = TrainOptions.from_args(args, iters=cfg['iters'], batch_size=cfg['batch_size'],
                                  seed=seed, eval=EvalOptions.from_args(args, cfg))
    with contextlib.ExitStack() as cpu_kernels:
        if args.device == 'cpu':  # the same values, fewer passes over each activation
            cpu_kernels.enter_context(conv_bias_in_batch_norm_kernel())
            cpu_kernels.enter_context(observers_without_copies())
        result = train(model, train_ds, val_ds, optimizer, scheduler, losses, cfg, opts,
                       resume=resume, teacher=teacher)
    best = os.path.join(args.save_dir, 'best_model')
    if result.best_iter > 0:
        logger.info('Training done at iter %d; best mIoU %.4f at iter %d, weights in %s',
                    result.iter, result.best_miou, result.best_iter, best)
    else:
        logger.info('Training done at iter %d; last weights in %s (add --do_eval to keep the '
                    'best by mIoU)', result.iter, best)
    return 0


def _run_local_job(args: argparse.Namespace, cfg: Yaml, quant: bool, processes: int,
                   seed: int) -> int:
    """The training command again as `processes` local processes of one data-parallel job
    (segslim.train.local_job), on an equal share of the threads and of each step's images."""
    threads = args.cpu_threads // processes
    batch = cfg['batch_size'] // processes
    logger.info('Training on CPU with %d processes x %d thread%s (--cpu_processes, '
                '--cpu_threads): each step\'s %d images, %d per process, batch norm over all '
                'of them', processes, threads, '' if threads == 1 else 's', cfg['batch_size'],
                batch)
    child = argparse.Namespace(**vars(args))
    child.batch_size, child.cpu_threads, child.seed = batch, threads, seed
    child.opts = list(args.opts or []) + [f'batch_size={batch}']  # over an --opts batch_size
    # the options go to each process on its stdin: no file is left behind by a killed job
    options = pickle.dumps(('qat_train' if quant else 'train', child))
    return run_local_job([sys.executable, '-m', 'segslim.cli.job_process'], processes,
                         threads, options)


def _load_for_inference(args: argparse.Namespace, cfg: Yaml, quant: bool,
                        summary_dir: Optional[str] = None):
    weights = ckpt.weights_path(args.model_path, cfg, args.config)
    if quant:
        return build_quant_model(cfg, qat_weights=weights, summary_dir=summary_dir)
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
                       auc_roc=getattr(args, 'auc_roc', False),
                       **EvalOptions.from_args(args, cfg).kwargs())
    print(format_metrics(metrics, '[EVAL]'), flush=True)
    if args.json:
        write_json(args.json, metrics)
    return 0


def _val_set_for_check(cfg: Yaml) -> Any:
    """The val set the INT8 engine is checked on, or None (logged) when there is none."""
    if not cfg.get('val_dataset'):
        logger.info('Config has no val_dataset: the INT8 engine was not checked')
        return None
    try:
        return build_dataset(cfg, 'val_dataset')
    except UserError as e:
        logger.warning('Skipped checking the INT8 engine: %s', e)
        return None


def _calibration_images(cfg: Yaml) -> List[str]:
    """A few train (else val) images for the ranges an INT8 ONNX needs beyond the program's
    scales; none (logged by the ONNX export) when the config's data is not on this machine."""
    from segslim.quant.ptq import calibration_paths
    for key in ('train_dataset', 'val_dataset'):
        if cfg.get(key):
            try:
                files = build_dataset(cfg, key).file_list
            except UserError:
                continue
            return calibration_paths(files, min(CALIBRATION_IMAGES, len(files)))
    return []


def _export_onnx(args: argparse.Namespace, cfg: Yaml, images: List[str]) -> None:
    export_onnx(args.save_dir, args.onnx_target or ONNX_TARGETS[0], images)


def run_export(args: argparse.Namespace, quant: bool = False) -> int:
    """export.py and qat_export.py: an inference model with its deploy.yaml."""
    cfg = _setup(args, EXPORT_KEYS)
    check_writable(args.save_dir)
    if args.to_onnx or args.onnx_target:
        require_onnx_export()
    model, quanter = _load_for_inference(args, cfg, quant, summary_dir=args.save_dir)
    export_inference_model(model, cfg, args.save_dir,
                           output_op_of(args.output_op, args.with_softmax, args.without_argmax),
                           args.input_shape, quanter,
                           quant_config_of(cfg)['int8_ops'] if quant else None)
    if args.to_onnx or args.onnx_target:
        _export_onnx(args, cfg, _calibration_images(cfg) if quant else [])
    if quant and getattr(args, 'verify_images', 0) > 0:
        from segslim.deploy.benchmark import check_int8_engine
        dataset = _val_set_for_check(cfg)
        if dataset is not None:
            check_int8_engine(dataset, args.save_dir, args.verify_images, model=model)
    return 0


def run_ptq(args: argparse.Namespace) -> int:
    """slim/quant/ptq.py: post-training quantization of FP32 weights (--model_path) or of an
    FP32 export (--model_dir), calibrated on train images; the same layout as qat_export."""
    from segslim.quant import ptq
    rounding = Rounding.from_args(args)  # flag combinations first: nothing written yet
    cfg = _setup(args, ('model', 'train_dataset'))
    check_writable(args.save_dir)
    if args.model_dir:  # a folder export.py wrote, checked before any work
        from segslim.modeldir import read_deploy
        read_deploy(args.model_dir)
    nncf = args.quantizer == 'nncf'
    ptq.check_quantizer_flags(args.quantizer, bool(args.to_onnx or args.onnx_target),
                              args.max_miou_drop, rounding)
    if args.to_onnx or args.onnx_target:
        require_onnx_export()
    if nncf:
        from segslim.quant.nncf import import_nncf
        import_nncf()
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
            ckpt.load_weights(model, ckpt.weights_path(args.model_path, cfg, args.config))
            fp32_dir = os.path.join(tmp, 'fp32')
            export_inference_model(model, cfg, fp32_dir, output_op_of(
                args.output_op, args.with_softmax, args.without_argmax), args.input_shape)
        if nncf:
            from segslim.quant.nncf import nncf_quantize
            val = None if args.max_miou_drop is None else build_dataset(cfg, 'val_dataset')
            nncf_quantize(fp32_dir, args.save_dir, paths, val, args.num_images,
                          args.max_miou_drop, args.max_reverted)
        else:
            skip = ptq.skipped_weights(model, qcfg, 'PTQ ({}, {})'.format(
                args.algo, '/'.join(qcfg['quantizable_layer_type'])), summary_dir=args.save_dir)
            ptq.post_training_quantize(fp32_dir, args.save_dir, paths, qcfg, skip, args.algo,
                                       args.batch_size, args.device, rounding)
        if args.to_onnx or args.onnx_target:
            _export_onnx(args, cfg, paths[:CALIBRATION_IMAGES])
        if args.verify_images > 0:
            from segslim.deploy.benchmark import check_int8_engine
            dataset = _val_set_for_check(cfg)
            if dataset is not None:
                check_int8_engine(dataset, args.save_dir, args.verify_images, fp32_dir=fp32_dir,
                                  backend='openvino' if nncf else 'paddle')
    return 0


def run_analysis(args: argparse.Namespace) -> int:
    """slim/quant/analysis.py: per-layer sensitivity, and with --max_miou_drop the smallest
    skip set whose PTQ model meets the budget on the engine."""
    from segslim.quant import sensitivity
    cfg = _setup(args, ('model', 'train_dataset', 'val_dataset'))
    check_writable(args.save_dir)
    weights = ckpt.weights_path(args.model_path, cfg, args.config)
    if args.backend != 'paddle' and args.max_miou_drop is not None:
        if (args.device or 'cpu') != 'cpu':
            raise UserError(f'--backend {args.backend} checks on CPU only; use --device cpu')
        if args.backend == 'onnxruntime':
            require_onnx_export()
        else:
            from segslim.deploy.openvino_engine import import_openvino
            import_openvino()
    paths = sensitivity.analyse(cfg, weights, args.config, args.save_dir, args.num_images,
                             args.calib_images, args.max_miou_drop, args.algo, args.device,
                             args.backend, args.input_shape)
    logger.info('Wrote %s, %s and %s', paths['md'], paths['png'], paths['yml'])
    return 0


def run_auto_quant(args: argparse.Namespace) -> int:
    """slim/quant/auto_quant.py: the steps of segslim.cli.auto_quant on this config and weights."""
    from segslim.cli import auto_quant as aq
    cfg = _setup(args, ('model', 'train_dataset', 'val_dataset'))
    check_writable(args.save_dir)
    if not os.path.isfile(args.model_path):
        raise UserError(f'--model_path {args.model_path} does not exist; pass the FP32 '
                        'model.pdparams (train.py writes best_model/model.pdparams)')
    ckpt.load_weights(builder.build_model(cfg), args.model_path)  # fit the config: now
    from segslim.deploy.engines import available_backends
    installed = available_backends()
    backends = args.backend or installed
    missing = [b for b in backends if b not in installed]
    if missing:
        raise UserError('--backend {}: not installed here (pip install -e .[openvino,onnx]); '
                        'installed: {}'.format(' '.join(missing), ' '.join(installed)))
    if (args.device or 'cpu') != 'cpu':
        raise UserError('auto-quant checks candidates on CPU engines; use --device cpu')
    from segslim.options import TIMING_SHAPE, qat_learning_rate, timing_shape
    steps = aq.Steps(args.config, args.model_path, args.save_dir, backends, args.num_images,
                     args.cpu_threads, 'cpu', args.calib_images, args.opts or (),
                     timing_shape(args.input_shape, args.export_shape, TIMING_SHAPE),
                     args.export_shape, qat_learning_rate(cfg))
    return aq.AutoQuant(steps, args.save_dir, args.max_miou_drop, args.max_qat_iters,
                        resume=args.resume).run()
