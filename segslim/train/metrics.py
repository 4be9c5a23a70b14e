"""Segmentation metrics from one confusion matrix."""
from typing import List, TypedDict

import numpy as np


class Metrics(TypedDict, total=False):
    """What an evaluation reports (val.py's log lines and the JSON that --save_dir keeps):
    mIoU, pixel accuracy, Cohen's kappa, mean Dice, per-class lists, the pixels counted, and
    AUC-ROC for two-class sets with --auc_roc."""
    miou: float
    acc: float
    kappa: float
    mdice: float
    class_iou: List[float]
    class_precision: List[float]
    class_recall: List[float]
    class_dice: List[float]
    pixels: int
    auc_roc: float


class ConfusionMatrix:
    """Counts (label, prediction) pixel pairs; rows are labels, columns predictions."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Adds one batch; pred and label hold class ids of the same shape."""
        pred = np.asarray(pred).reshape(-1).astype(np.int64)
        label = np.asarray(label).reshape(-1).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f'prediction and label sizes differ: {pred.shape} vs {label.shape}')
        keep = (label != self.ignore_index) & (label >= 0) & (label < self.num_classes)
        pred = np.clip(pred[keep], 0, self.num_classes - 1)
        idx = label[keep] * self.num_classes + pred
        self.matrix += np.bincount(idx, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def present_miou(self) -> float:
        """Mean IoU over the classes present in the labels or the predictions (1.0 when
        nothing was counted): the per-image score of the report's gallery."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        union = m.sum(axis=1) + m.sum(axis=0) - tp
        present = union > 0
        return float((tp[present] / union[present]).mean()) if present.any() else 1.0

    def compute(self) -> Metrics:
        """mIoU, pixel accuracy, Cohen's kappa, mean Dice and per-class IoU/precision/recall.

        A class absent from both labels and predictions gets IoU 0 and counts in the mean,
        as in PaddleSeg's metrics.
        """
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        label_sum = m.sum(axis=1)
        pred_sum = m.sum(axis=0)
        total = m.sum()
        union = label_sum + pred_sum - tp
        iou = _safe_div(tp, union)
        precision = _safe_div(tp, pred_sum)
        recall = _safe_div(tp, label_sum)
        dice = _safe_div(2 * tp, label_sum + pred_sum)
        acc = tp.sum() / total if total else 0.0
        expected = (label_sum * pred_sum).sum() / (total * total) if total else 0.0
        kappa = (acc - expected) / (1 - expected) if expected < 1 else 0.0
        return {
            'miou': float(iou.mean()),
            'acc': float(acc),
            'kappa': float(kappa),
            'mdice': float(dice.mean()),
            'class_iou': _floats(iou),
            'class_precision': _floats(precision),
            'class_recall': _floats(recall),
            'class_dice': _floats(dice),
            'pixels': int(total),
        }


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _floats(values: np.ndarray) -> List[float]:
    return [round(float(v), 6) for v in values]


def format_metrics(metrics: Metrics, title: str = '[EVAL]') -> str:
    """The two-line summary val.py, qat_val.py and training-time eval print."""
    head = '{} #pixels: {} mIoU: {:.4f} Acc: {:.4f} Kappa: {:.4f} Dice: {:.4f}'.format(
        title, metrics['pixels'], metrics['miou'], metrics['acc'], metrics['kappa'],
        metrics['mdice'])
    if 'auc_roc' in metrics:
        head += ' Auc_roc: {:.4f}'.format(metrics['auc_roc'])
    lines = [head]
    for name in ('class_iou', 'class_precision', 'class_recall'):
        lines.append('{} Class {}: {}'.format(
            title, name.split('_')[1].capitalize() if name != 'class_iou' else 'IoU',
            np.round(np.array(metrics[name]), 4).tolist()))
    return '\n'.join(lines)
