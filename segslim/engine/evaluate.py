"""Evaluation of a dygraph model on a dataset (FP32 or fake-quant alike)."""
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from segslim._paddle import paddle
from segslim.data.datasets import SegDataset
from segslim.data.loader import ordered_map
from segslim.engine.metrics import ConfusionMatrix
from segslim.errors import UserError
from segslim.logger import logger

from paddleseg.core import infer


def _read_sample(dataset: SegDataset, index: int) -> Dict[str, Any]:
    return dataset.sample(index)


def predict_sample(model: paddle.nn.Layer, sample: Dict[str, Any], aug_eval: bool = False,
                   scales: Union[float, Sequence[float]] = 1.0, flip_horizontal: bool = False,
                   flip_vertical: bool = False, is_slide: bool = False,
                   crop_size: Optional[Sequence[int]] = None,
                   stride: Optional[Sequence[int]] = None) -> np.ndarray:
    """Class ids H,W of one eval sample at its original size (call under paddle.no_grad)."""
    im = paddle.to_tensor(sample['img'][np.newaxis])
    if aug_eval:
        pred, _ = infer.aug_inference(
            model, im, trans_info=sample['trans_info'], scales=scales,
            flip_horizontal=flip_horizontal, flip_vertical=flip_vertical, is_slide=is_slide,
            crop_size=crop_size, stride=stride)
    else:
        pred, _ = infer.inference(model, im, trans_info=sample['trans_info'], is_slide=is_slide,
                                  crop_size=crop_size, stride=stride)
    return pred.numpy()[0, 0]


def evaluate(model: paddle.nn.Layer, dataset: SegDataset, aug_eval: bool = False,
             scales: Union[float, Sequence[float]] = 1.0, flip_horizontal: bool = False,
             flip_vertical: bool = False, is_slide: bool = False,
             crop_size: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None,
             log_every: int = 0, num_workers: int = 0) -> Dict[str, Any]:
    """Metrics of `model` on every sample of `dataset` at the original label size; worker
    processes read and transform samples ahead when num_workers > 0."""
    if is_slide and (crop_size is None or stride is None):
        raise UserError('--is_slide needs --crop_size W H and --stride W H')
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    samples = ordered_map(_read_sample, range(len(dataset)), dataset, num_workers)
    try:
        with paddle.no_grad():
            for i, sample in enumerate(samples):
                pred = predict_sample(model, sample, aug_eval, scales, flip_horizontal,
                                      flip_vertical, is_slide, crop_size, stride)
                cm.update(pred, sample['label'])
                if log_every and (i + 1) % log_every == 0:
                    logger.info('[EVAL] %d/%d images', i + 1, len(dataset))
    finally:
        samples.close()
        if was_training:
            model.train()
    return cm.compute()
