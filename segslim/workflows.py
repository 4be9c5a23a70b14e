"""What each script does once its flags are parsed: train, evaluate, export, FP32 or QAT."""
import argparse
import json
import os
import random
from typing import Any, Dict

import numpy as np

from segslim._paddle import check_versions, paddle, set_device
from segslim import builder, cli
from segslim.config import load_config, save_config
from segslim.data.datasets import DOWNLOAD_HOST, build_dataset, can_reach
from segslim.engine import checkpoint as ckpt
from segslim.engine.evaluate import evaluate
from segslim.engine.metrics import format_metrics
from segslim.engine.train import TrainOptions, restore_training, train
from segslim.errors import UserError
from segslim.export import export_inference_model, output_op_of
from segslim.logger import logger
from segslim.quant import build_quant_model


def _setup(args: argparse.Namespace, training: bool = False) -> Dict[str, Any]:
    check_versions()
    if training:
        cfg = load_config(args.config, args.iters, args.batch_size, args.learning_rate,
                          args.opts)
    else:
        cfg = load_config(args.config, opts=args.opts)
    args.device = set_device(args.device)
    return cfg


def _seed_everything(seed: int) -> None:
    paddle.seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _check_writable(save_dir: str) -> None:
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, '.write-test')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise UserError('--save_dir {} is not writable ({}); choose another folder'.format(
            save_dir, e.strerror))


def load_pretrained(model: paddle.nn.Layer, cfg: Dict[str, Any]) -> None:
    """Loads `model.pretrained` / `model.backbone.pretrained` (a path, or a URL fetched
    through paddleseg's downloader) into the matching sublayer, skipping unfit keys."""
    for sub, location in builder.pretrained_paths(cfg):
        key = 'model.{}pretrained'.format(sub + '.' if sub else '')
        if str(location).startswith(('http://', 'https://')):
            host = str(location).split('/')[2]
            if not can_reach((host, 443)):
                raise UserError('config key `{}`: {} cannot be downloaded (no network); fetch '
                                'it elsewhere and set the key to the local file'.format(
                                    key, location))
            from paddleseg.utils.download import download_file_and_uncompress
            from paddleseg.utils import seg_env
            folder = download_file_and_uncompress(
                url=location, savepath=seg_env.PRETRAINED_MODEL_HOME,
                extrapath=seg_env.PRETRAINED_MODEL_HOME)
            location = os.path.join(folder, 'model.pdparams')
        target = getattr(model, sub) if sub else model
        report = ckpt.load_weights(target, location, allow_partial=True, flag=key)
        logger.info('Loaded %s from %s (%d missing, %d unexpected, %d mismatched keys skipped)',
                    key, location, len(report['missing']), len(report['unexpected']),
                    len(report['mismatched']))


def run_train(args: argparse.Namespace, quant: bool = False) -> int:
    """train.py and qat_train.py: one loop; QAT only swaps in the quantized model."""
    cfg = _setup(args, training=True)
    _seed_everything(args.seed)
    resume = ckpt.load_checkpoint(args.resume_model) if args.resume_model else None
    _check_writable(args.save_dir)
    save_config(cfg, args.save_dir)
    if quant:
        fp32 = None if resume else args.model_path
        model, _ = build_quant_model(cfg, fp32_weights=fp32,
                                     allow_partial=getattr(args, 'allow_partial', False))
    else:
        model = builder.build_model(cfg)
        if resume is None:
            load_pretrained(model, cfg)
    train_ds = build_dataset(cfg, 'train_dataset', seed=args.seed)
    val_ds = build_dataset(cfg, 'val_dataset') if args.do_eval else None
    scheduler = builder.build_lr_scheduler(cfg)
    optimizer = builder.build_optimizer(cfg, model, scheduler)
    losses = builder.build_loss(cfg)
    if resume is not None:
        restore_training(resume, model, optimizer, scheduler)
    opts = TrainOptions(
        save_dir=args.save_dir, iters=cfg['iters'], batch_size=cfg['batch_size'],
        do_eval=args.do_eval, use_vdl=args.use_vdl, save_interval=max(args.save_interval, 1),
        log_iters=max(args.log_iters, 1), keep_checkpoint_max=args.keep_checkpoint_max,
        num_workers=args.num_workers, seed=args.seed,
        precision=getattr(args, 'precision', 'fp32'),
        amp_level=getattr(args, 'amp_level', 'O1'), eval_kwargs=cli.eval_kwargs(args, cfg))
    result = train(model, train_ds, val_ds, optimizer, scheduler, losses, cfg, opts,
                   resume=resume)
    logger.info('Training done at iter %d; best mIoU %.4f (iter %d); weights in %s',
                result['iter'], result['best_miou'], result['best_iter'],
                os.path.join(args.save_dir, 'best_model'))
    return 0


def _load_for_inference(args: argparse.Namespace, cfg: Dict[str, Any], quant: bool):
    if quant:
        return build_quant_model(cfg, qat_weights=args.model_path)
    model = builder.build_model(cfg)
    ckpt.load_weights(model, args.model_path)
    return model, None


def run_val(args: argparse.Namespace, quant: bool = False) -> int:
    """val.py and qat_val.py: metrics of a checkpoint on the config's val set."""
    cfg = _setup(args)
    model, _ = _load_for_inference(args, cfg, quant)
    val_ds = build_dataset(cfg, 'val_dataset')
    logger.info('Evaluating %s on %d images', args.model_path, len(val_ds))
    metrics = evaluate(model, val_ds, **cli.eval_kwargs(args, cfg))
    print(format_metrics(metrics, '[EVAL]'), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(metrics, f, indent=2)
    return 0


def run_export(args: argparse.Namespace, quant: bool = False) -> int:
    """export.py and qat_export.py: an inference model with its deploy.yaml."""
    cfg = _setup(args)
    model, quanter = _load_for_inference(args, cfg, quant)
    export_inference_model(model, cfg, args.save_dir,
                           output_op_of(args.output_op, args.with_softmax, args.without_argmax),
                           args.input_shape, quanter)
    return 0
