import numpy as np
import pytest

from segslim.train.metrics import ConfusionMatrix


def test_against_hand_computed_matrix():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, label)
    # rows = label, cols = prediction; the 255 pixel is ignored
    expected = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    np.testing.assert_array_equal(cm.matrix, expected)
    m = cm.compute()
    iou = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]
    assert m['class_iou'] == pytest.approx(iou, abs=1e-6)
    assert m['miou'] == pytest.approx(np.mean(iou))
    assert m['acc'] == pytest.approx(4 / 7)
    pe = (2 * 3 + 3 * 3 + 2 * 1) / 49
    assert m['kappa'] == pytest.approx((4 / 7 - pe) / (1 - pe))
    assert m['class_precision'] == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-6)
    assert m['class_recall'] == pytest.approx([1 / 2, 2 / 3, 1 / 2], abs=1e-6)
    assert m['pixels'] == 7


def test_updates_accumulate_and_perfect_is_one():
    cm = ConfusionMatrix(2)
    for _ in range(3):
        lab = np.random.default_rng(0).integers(0, 2, (8, 8))
        cm.update(lab, lab)
    m = cm.compute()
    assert m['miou'] == 1.0 and m['acc'] == 1.0 and m['pixels'] == 192


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((3, 3)))
