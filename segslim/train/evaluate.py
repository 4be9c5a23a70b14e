"""Evaluation of a dygraph model on a dataset (FP32 or fake-quant alike)."""
from typing import List, Optional, Sequence, Union

import numpy as np
from paddleseg.core import infer

from segslim._paddle import paddle
from segslim.data.datasets import Sample, SegDataset
from segslim.data.loader import ordered_map
from segslim.errors import UserError
from segslim.logger import logger
from segslim.train import distributed
from segslim.train.metrics import ConfusionMatrix, Metrics


def _read_sample(dataset: SegDataset, index: int) -> Sample:
    return dataset.sample(index)


def predict_sample(model: paddle.nn.Layer, sample: Sample, aug_eval: bool = False,
                   scales: Union[float, Sequence[float]] = 1.0, flip_horizontal: bool = False,
                   flip_vertical: bool = False, is_slide: bool = False,
                   crop_size: Optional[Sequence[int]] = None,
                   stride: Optional[Sequence[int]] = None, with_logit: bool = False):
    """Class ids H,W of one eval sample at its original size (call under paddle.no_grad);
    with_logit: (ids, logit C,H,W at that size)."""
    im = paddle.to_tensor(sample['img'][np.newaxis])
    if aug_eval:
        pred, logit = infer.aug_inference(
            model, im, trans_info=sample['trans_info'], scales=scales,
            flip_horizontal=flip_horizontal, flip_vertical=flip_vertical, is_slide=is_slide,
            crop_size=crop_size, stride=stride)
    else:
        pred, logit = infer.inference(model, im, trans_info=sample['trans_info'], is_slide=is_slide,
                                  crop_size=crop_size, stride=stride)
    if with_logit:
        return pred.numpy()[0, 0], logit.numpy()[0]
    return pred.numpy()[0, 0]


class ScoreCollector:
    """Softmax scores and labels of the valid pixels, for AUC-ROC (PaddleSeg's --auc_roc:
    binary uses the foreground score, more classes one-vs-rest)."""

    def __init__(self, num_classes: int, ignore_index: int):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.scores: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []

    def update(self, logit: np.ndarray, label: np.ndarray) -> None:
        e = np.exp(logit - logit.max(axis=0, keepdims=True))
        probs = (e / e.sum(axis=0, keepdims=True)).reshape(logit.shape[0], -1).T
        label = label.reshape(-1)
        valid = label != self.ignore_index
        self.scores.append(probs[valid].astype(np.float32))
        self.labels.append(label[valid])

    def compute(self) -> float:
        from sklearn.metrics import roc_auc_score
        scores, labels = np.concatenate(self.scores), np.concatenate(self.labels)
        if len(np.unique(labels)) < 2:
            return float('nan')  # undefined with a single class present
        if self.num_classes == 2:
            return float(roc_auc_score(labels, scores[:, 1]))
        return float(roc_auc_score(labels, scores, multi_class='ovr',
                                   labels=list(range(self.num_classes))))


def evaluate(model: paddle.nn.Layer, dataset: SegDataset, aug_eval: bool = False,
             scales: Union[float, Sequence[float]] = 1.0, flip_horizontal: bool = False,
             flip_vertical: bool = False, is_slide: bool = False,
             crop_size: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
             log_every: int = 0, num_workers: int = 0, auc_roc: bool = False) -> Metrics:
    """Metrics of `model` on every sample of `dataset` at the original label size; worker
    processes read and transform samples ahead when num_workers > 0; auc_roc adds
    'auc_roc'. Under paddle.distributed.launch each process evaluates its share of the
    samples and the confusion matrices are summed, so every process gets the metrics of
    the whole set (AUC-ROC, which needs every score, is then computed on one process's
    share)."""
    if is_slide and (crop_size is None or stride is None):
        raise UserError('--is_slide needs --crop_size W H and --stride W H')
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    scores = ScoreCollector(dataset.num_classes, dataset.ignore_index) if auc_roc else None
    rank, size = distributed.world()
    samples = ordered_map(_read_sample, range(rank, len(dataset), size), dataset, num_workers)
    try:
        with paddle.no_grad():
            for i, sample in enumerate(samples):
                pred = predict_sample(model, sample, aug_eval, scales, flip_horizontal,
                                      flip_vertical, is_slide, crop_size, stride,
                                      with_logit=auc_roc)
                if scores is not None:
                    pred, logit = pred
                    scores.update(logit, sample['label'])
                cm.update(pred, sample['label'])
                if log_every and (i + 1) % log_every == 0:
                    logger.info('[EVAL] %d/%d images', (i + 1) * size, len(dataset))
    finally:
        samples.close()
        if was_training:
            model.train()
    cm.matrix = distributed.all_reduce_sum(cm.matrix)
    metrics = cm.compute()
    if scores is not None:
        metrics['auc_roc'] = scores.compute()
    return metrics
