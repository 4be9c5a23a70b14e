"""Dataset building and sample reading with the checks users need when data is wrong."""
import os
import random
import socket
import threading
from typing import Any, Dict, List, Optional, Tuple, TypedDict

import cv2
import numpy as np
from PIL import Image

from segslim.errors import UserError
from segslim.logger import logger
from segslim.config import Yaml

DEMO_HINT = 'python tools/make_demo_dataset.py --save_dir {}'
DOWNLOAD_HOST = ('paddleseg.bj.bcebos.com', 443)


class Sample(TypedDict, total=False):
    """One sample as paddleseg's transforms pass it along: the image (C,H,W float32 after
    Normalize), its label (H,W int64, absent without one), the resize/padding records that
    restore the original size, and the fields the transforms move with the image."""
    img: np.ndarray
    label: np.ndarray
    trans_info: List[Any]
    gt_fields: List[str]


def can_reach(host: Tuple[str, int], timeout: float = 3.0) -> bool:
    """True when a TCP connection to host opens within timeout (DNS included); never hangs."""
    if os.environ.get('SEGSLIM_OFFLINE'):
        return False
    result = []

    def probe() -> None:
        try:
            socket.create_connection(host, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result)


def check_root(data_cfg: Yaml, key: str) -> None:
    root = data_cfg.get('dataset_root')
    if root is not None and os.path.isdir(root):
        return
    where = root if root is not None else 'the paddleseg data home'
    if data_cfg['type'] == 'Dataset' or not can_reach(DOWNLOAD_HOST):
        raise UserError(
            'config key `{}.dataset_root`: {} does not exist{}; put the dataset there '
            '(optic-disc layout: images, labels, train_list.txt, val_list.txt) or generate '
            'demo data with `{}`'.format(
                key, where, '' if data_cfg['type'] == 'Dataset'
                else ' and the download server is unreachable', DEMO_HINT.format(
                    root or 'data/optic_disc_seg')))
    logger.info('%s: dataset_root %s is missing, downloading it', key, where)


def read_image(path: str) -> np.ndarray:
    """The image as float32 HxWx3 BGR; grayscale, alpha and 16-bit images are converted."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError('image {} cannot be decoded; replace it with a JPEG or PNG '
                        'image'.format(path))
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2BGR)
    return img.astype('float32')


def read_label(path: str) -> np.ndarray:
    """The label map as a 2-D integer array; a colour (3-channel) label is an error."""
    try:
        with Image.open(path) as im:
            label = np.asarray(im)
    except (OSError, ValueError) as e:
        raise UserError('label {} cannot be read ({}); labels are single-channel PNG '
                        'maps of class ids'.format(path, e))
    if label.ndim != 2:
        raise UserError('label {} has {} channels; labels must be single-channel PNG maps of '
                        'class ids (P or L mode)'.format(path, label.shape[-1]))
    return label


class SegDataset:
    """Samples of a paddleseg dataset, read and checked here.

    Train samples are (img CHW float32, label HW int64) after the transforms; eval samples
    add `trans_info` and keep the label at the original size. `sample(key)` takes
    key = epoch * len + index so random augmentation is a pure function of
    (seed, epoch, index): a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, file_list: List[Tuple[str, Optional[str]]], transforms: list,
                 num_classes: int, ignore_index: int, mode: str, key: str, seed: int = 0):
        from paddleseg.transforms import Compose
        self.file_list = file_list
        self.compose = Compose(transforms)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mode = mode
        self.key = key
        self.seed = seed

    def __len__(self) -> int:
        return len(self.file_list)

    def __getitem__(self, key: int) -> Sample:
        return self.sample(key)

    def sample(self, key: int) -> Sample:
        epoch, index = divmod(int(key), len(self.file_list))
        img_path, label_path = self.file_list[index]
        img = read_image(img_path)
        data: Sample = {'img': img, 'trans_info': [], 'gt_fields': []}
        if label_path is not None:
            label = read_label(label_path)  # its size was checked by check_files
            self.check_values(label, label_path)
            data['label'] = label
            if self.mode == 'train':
                data['gt_fields'].append('label')
        seed = (self.seed * 1000003 + epoch) * 1000003 + index
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        data = self.compose(data)
        if 'label' in data:
            data['label'] = data['label'].astype('int64')
        return data

    def check_values(self, label: np.ndarray, path: str) -> None:
        values = np.unique(label)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if bad.size:
            raise UserError('label {} holds class ids {} outside [0, {}) and not the ignore '
                            'index {}; fix the label or num_classes'.format(
                                path, bad[:5].tolist(), self.num_classes,
                                self.ignore_index))


def check_files(file_list: List[Tuple[str, Optional[str]]], key: str) -> None:
    """Every listed file exists and decodes as an image, and each label has its image's
    size. Reads headers only, so it is quick even for large sets; label values are checked
    when a sample is read."""
    for img, lab in file_list:
        sizes = []
        for path in (img, lab):
            if path is None:
                continue
            if not os.path.isfile(path):
                raise UserError('config key `{}`: {} is listed but does not exist; fix the '
                                'list file or add the file'.format(key, path))
            try:
                with Image.open(path) as im:
                    sizes.append(im.size)
            except (OSError, ValueError):
                raise UserError('config key `{}`: {} is not an image; fix the list file or '
                                'replace the file'.format(key, path))
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            raise UserError('label {} is {}x{} but its image {} is {}x{}; labels must match '
                            'their images'.format(lab, sizes[1][0], sizes[1][1], img,
                                                  sizes[0][0], sizes[0][1]))


def collate(samples: List[Sample], key: str) -> Tuple[np.ndarray, np.ndarray]:
    """Stacks train samples; differing sizes mean the transforms lack a Resize or crop."""
    shapes = {s['img'].shape for s in samples}
    if len(shapes) > 1:
        raise UserError('config key `{}.transforms`: samples of a batch have different sizes '
                        '{}; add Resize or RandomPaddingCrop'.format(key, sorted(shapes)))
    return (np.stack([s['img'] for s in samples]).astype('float32'),
            np.stack([s['label'] for s in samples]).astype('int64'))
