"""Prediction on image files with an exported model: pseudo-colour masks and overlays."""
import functools
import os
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from segslim.data.datasets import read_image
from segslim.deploy.engine import EngineBase, restore_size
from segslim.errors import UserError
from segslim.fileio import atomic_write, write_bytes
from segslim.modeldir import Preprocessor

STAGES = ('preprocess', 'inference', 'postprocess')


def list_images(image_path: str) -> List[Tuple[str, str]]:
    """[(image path, output name without extension)] for an image, a folder (recursively) or
    a file list, as PaddleSeg's infer.py reads --image_path. Output names keep the
    sub-folders below the folder (or the list's folder), so equal file names in different
    sub-folders do not overwrite each other."""
    from paddleseg.utils import get_image_list
    if not os.path.exists(image_path):
        raise UserError(f'--image_path {image_path} does not exist; pass an image, a folder or a '
                        'file list')
    try:
        paths, base = get_image_list(image_path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'--image_path {image_path} cannot be read ({e})') from e
    except RuntimeError:
        raise UserError(f'--image_path {image_path} holds no images (.jpg, .jpeg, .png, '
                        '.bmp)') from None
    if base is not None:  # a blank line of a file list names the list's folder itself
        paths = [p for p in paths if os.path.normpath(p) != os.path.normpath(base)]
    if not paths:
        raise UserError(f'--image_path {image_path} lists no images')
    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f'{path} is listed in --image_path {image_path} but does not exist; '
                            'fix the list (paths are relative to its folder)')
        rel = os.path.relpath(path, base) if base is not None else os.path.basename(path)
        if rel.startswith(os.pardir):
            rel = os.path.basename(path)
        out.append((path, os.path.splitext(rel)[0]))
    return out


def pseudo_color(labels: np.ndarray):
    """A palette PNG image of a label map (PaddleSeg's colour map)."""
    from paddleseg.utils.visualize import get_pseudo_color_map
    return get_pseudo_color_map(labels.astype(np.uint8))


def predict_images(predictor: EngineBase, images: List[Tuple[str, str]], save_dir: str,
                   batch_size: int = 1, overlay: bool = False,
                   timings: Optional[Dict[str, List[float]]] = None) -> List[str]:
    """Writes <save_dir>/<name>.png masks (and <name>_overlay.jpg) for list_images() items;
    returns the mask paths. With `timings`, appends seconds per batch of each stage."""
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot write --save_dir {save_dir} ({e.strerror})') from e
    pre = Preprocessor(predictor.deploy['transforms'])
    written = []
    for start in range(0, len(images), max(batch_size, 1)):
        chunk = images[start:start + batch_size]
        tic = time.perf_counter()
        inputs = [pre(path) for path, _ in chunk]
        shapes = {img.shape for img, _ in inputs}
        batches = [np.stack([img for img, _ in inputs])] if len(shapes) == 1 else \
            [img[np.newaxis] for img, _ in inputs]  # different sizes cannot share a batch
        mid = time.perf_counter()
        outputs = [predictor.run(batch) for batch in batches]
        done = time.perf_counter()
        labels = [lab for out in outputs for lab in predictor.to_labels(out)]
        labels = [restore_size(lab, info) for lab, (_, info) in zip(labels, inputs)]
        if timings is not None:
            for stage, secs in zip(STAGES, (mid - tic, done - mid, time.perf_counter() - done)):
                timings.setdefault(stage, []).append(secs)
        for (path, name), lab in zip(chunk, labels):
            out = os.path.join(save_dir, name + '.png')
            os.makedirs(os.path.dirname(out), exist_ok=True)
            mask = pseudo_color(lab)
            atomic_write(out, functools.partial(mask.save, format='PNG'))
            written.append(out)
            if overlay:
                img = read_image(path).astype(np.uint8)
                color = np.array(mask.convert('RGB'))[..., ::-1]
                mixed = np.where(lab[..., None] > 0, (0.5 * img + 0.5 * color), img)
                _, jpg = cv2.imencode('.jpg', mixed.astype(np.uint8))
                write_bytes(os.path.join(save_dir, name + '_overlay.jpg'), jpg.tobytes())
    return written
