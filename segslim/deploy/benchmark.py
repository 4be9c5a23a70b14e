"""FP32 vs INT8 on the deployed engine: mIoU with the training metric code, latency
(interleaved, median and p90), pixel agreement, and which convs really run INT8."""
import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np

from segslim.data.datasets import SegDataset, read_label
from segslim.deploy.cpu import cpu_features
from segslim.deploy.predictor import (EngineBase, EngineOptions, Preprocessor,
                                      check_engine_options, create_predictor, restore_size)
from segslim.engine.metrics import ConfusionMatrix
from segslim.logger import logger


def predict_dataset(predictor: EngineBase, dataset: SegDataset,
                    limit: Optional[int] = None) -> List[np.ndarray]:
    """Label maps of the val images (the first `limit`) at their labels' size."""
    pre = Preprocessor(predictor.deploy['transforms'])
    preds = []
    for img_path, _ in dataset.file_list[:limit]:
        img, info = pre(img_path)
        preds.append(restore_size(predictor.labels(img[np.newaxis])[0], info))
    return preds


def agreement_with_model(model: Any, predictor: EngineBase, dataset: SegDataset,
                         limit: int) -> float:
    """Share of pixels where the engine and the dygraph model (e.g. the QAT model with its
    fake-quant ops) predict the same class, over the first `limit` val images. Both sides'
    labels go back to the label size by the same rule (restore_size), so a Resize in the
    deploy transforms does not bias the count."""
    from segslim._paddle import paddle
    from paddleseg.core import infer
    engine = predict_dataset(predictor, dataset, limit)
    model.eval()
    ours = []
    with paddle.no_grad():
        for i in range(len(engine)):
            sample = dataset[i]
            logit = infer.inference(model, paddle.to_tensor(sample['img'][np.newaxis]))
            labels = logit.argmax(axis=1).numpy()[0]
            ours.append(restore_size(labels, sample['trans_info']))
    return agreement(engine, ours)


def score(preds: List[np.ndarray], dataset: SegDataset) -> Dict[str, Any]:
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    for pred, (_, label_path) in zip(preds, dataset.file_list):
        cm.update(pred, read_label(label_path))
    return cm.compute()


def agreement(a: List[np.ndarray], b: List[np.ndarray]) -> float:
    same = sum(int((x == y).sum()) for x, y in zip(a, b))
    return same / max(sum(x.size for x in a), 1)


def time_interleaved(predictors: Sequence[EngineBase], batch: np.ndarray, warmup: int,
                     repeats: int) -> List[List[float]]:
    """Seconds per run of each predictor; runs alternate between predictors so that
    machine noise hits all of them alike. Each timed run follows an untimed one of the same
    predictor: the engine that ran before keeps its threads spinning for a while (OpenMP,
    TBB, onnxruntime's pool), which would otherwise be charged to the next engine."""
    for p in predictors:
        for _ in range(warmup):
            p.run(batch)
    times: List[List[float]] = [[] for _ in predictors]
    for _ in range(repeats):
        for i, p in enumerate(predictors):
            p.run(batch)
            tic = time.perf_counter()
            p.run(batch)
            times[i].append(time.perf_counter() - tic)
    return times


BF16_BACKENDS = ('paddle', 'openvino')  # onnxruntime has no bf16 CPU kernels to compare


def benchmark(model_dirs: Sequence[str], dataset: Optional[SegDataset], opts: EngineOptions,
              shape: Sequence[int] = (1, 3, 512, 512), warmup: int = 5, repeats: int = 20,
              with_bf16: Optional[bool] = None,
              backends: Sequence[str] = ('paddle',),
              predictions: Optional[List[List[np.ndarray]]] = None) -> Dict[str, Any]:
    """The report dict: {'isa', 'threads', 'cpu', 'input_shape', 'rows': [...]}; every model
    dir runs on every backend; the first model dir on the first backend (in FP32) is the
    baseline for speedup and pixel agreement, and FP32 models also get a bf16 row where the
    CPU has bf16. With a dataset and a `predictions` list, each row's val label maps are
    appended to it."""
    check_engine_options(opts)
    cpu = cpu_features()
    runs = []  # (model_dir, predictor); each row is labelled with what its engine ran
    float_precision = 'fp16' if opts.precision == 'fp16' else 'fp32'
    bf16 = with_bf16 if with_bf16 is not None else cpu['bf16']
    for backend in backends:
        for i, model_dir in enumerate(model_dirs):
            run_opts = dataclasses.replace(opts, precision=float_precision, backend=backend)
            pred = create_predictor(model_dir, run_opts)
            runs.append((model_dir, pred))
            if i == 0 and opts.device == 'cpu' and opts.enable_mkldnn and not pred.quantized \
                    and bf16 and backend in BF16_BACKENDS:
                runs.append((model_dir, create_predictor(
                    model_dir, dataclasses.replace(run_opts, precision='bf16'))))
    batch = _timing_batch(runs[0][1], dataset, shape)
    times = time_interleaved([p for _, p in runs], batch, warmup, repeats)
    rows = []
    base_preds = None
    for (model_dir, pred), secs in zip(runs, times):
        precision = pred.precision
        row: Dict[str, Any] = {
            'model_dir': model_dir, 'precision': precision, 'backend': pred.backend,
            's_per_img': float(np.median(secs)) / shape[0],
            'p90_s': float(np.percentile(secs, 90)) / shape[0],
            'params_mb': os.path.getsize(pred.deploy['params']) / 2 ** 20,
            'fallback': pred.fallback,
        }
        for key in ('int8_ops', 'quantizable_ops', 'fp32_ops', 'by_type', 'conv_ops',
                    'int8_conv_ops', 'matmul_ops', 'int8_matmul_ops'):
            row[key] = pred.engine.get(key)
        if dataset is not None:
            logger.info('Evaluating %s (%s) on %d images', model_dir, precision, len(dataset))
            preds = predict_dataset(pred, dataset)
            metrics = score(preds, dataset)
            row.update(miou=metrics['miou'], class_iou=metrics['class_iou'],
                       acc=metrics['acc'])
            if base_preds is None:
                base_preds = preds
            if predictions is not None:
                predictions.append(preds)
            row['pixel_agreement'] = agreement(preds, base_preds)
        rows.append(row)
    base = rows[0]['s_per_img']
    bf16_s = min((r['s_per_img'] for r in rows if r['precision'] == 'bf16'), default=None)
    for row in rows:
        row['speedup'] = base / row['s_per_img']
        row['speedup_vs_bf16'] = bf16_s / row['s_per_img'] if bf16_s else None
    return {'isa': cpu['isa'] if opts.device == 'cpu' else 'gpu', 'cpu': cpu['model'],
            'vnni': cpu['vnni'], 'threads': opts.cpu_threads, 'device': opts.device,
            'input_shape': list(shape), 'warmup': warmup, 'repeats': repeats, 'rows': rows}


def _timing_batch(pred: EngineBase, dataset: Optional[SegDataset],
                  shape: Sequence[int]) -> np.ndarray:
    """A real val image resized to `shape` (random data if there is no dataset)."""
    n, c, h, w = shape
    if dataset is None:
        return np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    img, _ = Preprocessor(pred.deploy['transforms'])(dataset.file_list[0][0])
    img = cv2.resize(np.transpose(img, (1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.repeat(np.transpose(img, (2, 0, 1))[np.newaxis], n, axis=0).astype(np.float32)


ENGINE_NAMES = {'paddle': 'Paddle Inference', 'openvino': 'OpenVINO'}


def engine_name(row: Dict[str, Any]) -> str:
    return ENGINE_NAMES.get(row.get('backend', 'paddle'), row.get('backend', ''))


def precision_label(precision: str) -> str:
    """'INT8', 'BF16', ...; a sentence such as 'fp32 (QAT model, no INT8 kernels)' stays."""
    return precision if ' ' in precision else precision.upper()


def _ops_cell(row: Dict[str, Any]) -> str:
    """'47/47' INT8 over quantizable ops, split by kind where matmuls are present."""
    if row.get('quantizable_ops') is None:
        return '-'
    if not row.get('matmul_ops'):
        return '{}/{}'.format(row['int8_ops'], row['quantizable_ops'])
    return 'conv {}/{}, matmul {}/{}'.format(row['int8_conv_ops'], row['conv_ops'],
                                              row['int8_matmul_ops'], row['matmul_ops'])


def format_report(report: Dict[str, Any], name: Optional[str] = None) -> str:
    """The markdown report: header line, the main table (rows named by `name` when given,
    else by model folder), per-class IoU, notes on fallbacks and FP32 ops."""
    lines = ['Device: {} | CPU: {} | ISA: {} | threads: {} | input {} | median of {} runs, '
             'models interleaved'.format(report['device'], report['cpu'], report['isa'],
                                         report['threads'], 'x'.join(map(str,
                                                                         report['input_shape'])),
                                         report['repeats'])]
    if report['device'] == 'cpu' and not report['vnni']:
        lines.append('WARNING: this CPU has no VNNI/AMX: INT8 convolutions gain little here.')
    lines += ['', '| Model | Engine | Type | mIoU | s/img | p90 s | speedup | vs best bf16 | '
              'params MB | agreement | INT8 ops |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in report['rows']:
        lines.append('| {} | {} | {} | {} | {:.4f} | {:.4f} | {:.2f}x | {} | {:.1f} | {} | {} '
                     '|'.format(
            name or r['model_dir'], engine_name(r), precision_label(r['precision']),
            '{:.4f}'.format(r['miou']) if 'miou' in r else '-', r['s_per_img'], r['p90_s'],
            r['speedup'], '{:.2f}x'.format(r['speedup_vs_bf16']) if r['speedup_vs_bf16'] else '-',
            r['params_mb'],
            '{:.4%}'.format(r['pixel_agreement']) if 'pixel_agreement' in r else '-',
            _ops_cell(r)))
    if any('class_iou' in r for r in report['rows']):
        lines += ['', '| Model | Engine | Type | per-class IoU |', '|---|---|---|---|']
        for r in report['rows']:
            lines.append('| {} | {} | {} | {} |'.format(name or r['model_dir'], engine_name(r),
                                                       precision_label(r['precision']),
                                                  ', '.join('{:.4f}'.format(v)
                                                            for v in r.get('class_iou', []))))
    for r in report['rows']:
        if r['fallback']:
            lines.append('Note: {} ({}, {}): {}'.format(name or r['model_dir'], engine_name(r),
                                                       r['precision'], r['fallback']))
        if r['precision'] == 'int8' and r.get('fp32_ops'):
            lines.append('Note: {} on {} runs {} quantizable ops in FP32: {}'.format(
                name or r['model_dir'], engine_name(r), len(r['fp32_ops']),
                ', '.join(r['fp32_ops'][:6])))
    return '\n'.join(lines)
