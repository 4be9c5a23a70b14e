"""Prediction on image files with an exported model: pseudo-colour masks and overlays."""
import os
from typing import List

import cv2
import numpy as np

from segslim.data.datasets import read_image
from segslim.deploy.predictor import Predictor, Preprocessor, restore_size
from segslim.errors import UserError
from segslim.fileio import atomic_write, write_bytes

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(image_path: str) -> List[str]:
    """The image file, or the images of a folder (sorted); a one-line error if none."""
    if os.path.isfile(image_path):
        return [image_path]
    if os.path.isdir(image_path):
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(image_path)
                       for name in names if name.lower().endswith(IMAGE_EXTS))
        if not found:
            raise UserError('--image_path {} holds no images ({})'.format(
                image_path, ', '.join(IMAGE_EXTS)))
        return found
    raise UserError('--image_path {} does not exist; pass an image file or a folder'.format(
        image_path))


def pseudo_color(labels: np.ndarray):
    """A palette PNG image of a label map (PaddleSeg's colour map)."""
    from paddleseg.utils.visualize import get_pseudo_color_map
    return get_pseudo_color_map(labels.astype(np.uint8))


def predict_images(predictor: Predictor, paths: List[str], save_dir: str,
                   batch_size: int = 1, overlay: bool = False) -> List[str]:
    """Writes <save_dir>/<name>.png masks (and <name>_overlay.jpg); returns the mask paths."""
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise UserError('cannot write --save_dir {} ({})'.format(save_dir, e.strerror))
    pre = Preprocessor(predictor.deploy['transforms'])
    written = []
    for start in range(0, len(paths), max(batch_size, 1)):
        chunk = paths[start:start + batch_size]
        inputs = [pre(p) for p in chunk]
        shapes = {img.shape for img, _ in inputs}
        if len(shapes) == 1:
            labels = list(predictor.labels(np.stack([img for img, _ in inputs])))
        else:  # different sizes cannot share a batch
            labels = [predictor.labels(img[np.newaxis])[0] for img, _ in inputs]
        for path, (_, info), lab in zip(chunk, inputs, labels):
            lab = restore_size(lab, info)
            name = os.path.splitext(os.path.basename(path))[0]
            out = os.path.join(save_dir, name + '.png')
            mask = pseudo_color(lab)
            atomic_write(out, lambda tmp: mask.save(tmp, format='PNG'))
            written.append(out)
            if overlay:
                img = read_image(path).astype(np.uint8)
                color = np.array(pseudo_color(lab).convert('RGB'))[..., ::-1]
                mixed = np.where(lab[..., None] > 0, (0.5 * img + 0.5 * color), img)
                _, jpg = cv2.imencode('.jpg', mixed.astype(np.uint8))
                write_bytes(os.path.join(save_dir, name + '_overlay.jpg'), jpg.tobytes())
    return written
