"""Checkpoint io: atomic writes, strict weight loading, resume state, pruning.

A checkpoint folder (`iter_N/`, `best_model/`) holds model.pdparams, and for resumable
ones model.pdopt (optimizer + LR scheduler) and train_state.json (iteration, best metric,
seed, resolved config: data, never code). Folders are written with fileio.atomic_dir, so a
kill at any moment leaves every complete checkpoint intact (fileio.recover cleans up after
one). Also here: where weights come from (--model_path, `model.pretrained`, URLs).
"""
import glob
import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, TypedDict, Union, cast

import numpy as np

from segslim import builder
from segslim._paddle import paddle
from segslim.config import Yaml
from segslim.data.datasets import can_reach
from segslim.errors import UserError
from segslim.fileio import atomic_dir, remove_path
from segslim.logger import logger


class TrainState(TypedDict, total=False):
    """train_state.json of a resumable checkpoint: where the run stands and what it keeps."""
    iter: int
    best_miou: float
    best_iter: int
    best_ema: List[Union[float, int]]  # [mIoU, iter] of the best EMA weights
    seed: int
    config: Yaml  # the resolved config the run trained with
    scaler: Dict[str, object]  # AMP's loss-scale state (paddle's GradScaler.state_dict)


@dataclass(frozen=True)
class Resume:
    """A checkpoint folder read for --resume_model: its weights file, the optimizer's state
    dict (paddle's, with the LR scheduler's inside) and the training state."""
    params: str
    optimizer: Dict[str, object]
    state: TrainState

PARAMS = 'model.pdparams'
OPT = 'model.pdopt'
STATE = 'train_state.json'
LEGACY_STATE = 'train_state.pkl'  # older runs: read as plain data only


def params_file(path: str, flag: str = '--model_path') -> str:
    """The .pdparams file `path` names (a file, or a folder holding model.pdparams), or a
    one-line error naming it."""
    if os.path.isdir(path):
        path = os.path.join(path, PARAMS)
    if not os.path.isfile(path):
        raise UserError(f'{flag} {path} does not exist; pass a model.pdparams written by train.py '
                        'or qat_train.py')
    return path


def read_params(path: str, flag: str = '--model_path') -> Dict[str, np.ndarray]:
    """The state dict stored in a .pdparams file, or a one-line error naming the file."""
    path = params_file(path, flag)
    try:
        state = paddle.load(path, return_numpy=True)
    except Exception as e:  # paddle raises many types for a bad file
        raise UserError(f'{flag} {path} is not a Paddle params file ({type(e).__name__}); pass a '
                        'model.pdparams written by train.py or qat_train.py') from e
    if not isinstance(state, dict) or not state or not all(
            hasattr(v, 'shape') for v in state.values()):
        raise UserError(f'{flag} {path} holds no model weights; pass a model.pdparams written by '
                        'train.py or qat_train.py')
    return state


def is_quantized(keys: Iterable[str]) -> bool:
    """True for the state dict of a QAT (fake-quant) model."""
    return any('_fake_quant' in k for k in keys)


def load_weights(model: paddle.nn.Layer, path: str, allow_partial: bool = False,
                 flag: str = '--model_path') -> Dict[str, List[str]]:
    """Loads a params file into `model`; any missing, unexpected or shape-mismatched key is
    an error listing them unless `allow_partial`. Returns the three lists."""
    state = read_params(path, flag)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k} {list(state[k].shape)}->{list(own[k].shape)}'
                  for k in own if k in state and list(state[k].shape) != list(own[k].shape)]
    report = {'missing': missing, 'unexpected': unexpected, 'mismatched': mismatched}
    if (missing or unexpected or mismatched) and not allow_partial:
        if is_quantized(own) and not is_quantized(state):
            raise UserError(f'{flag} {path} holds FP32 weights but this model is quantized; run '
                            'slim/quant/qat_train.py first and pass its best_model/model.pdparams')
        if is_quantized(state) and not is_quantized(own):
            raise UserError(f'{flag} {path} holds QAT (quantized) weights; use the '
                            'slim/quant/qat_*.py scripts for them')
        parts = []
        for kind, keys in report.items():
            if keys:
                parts.append('{} {} ({}{})'.format(len(keys), kind, ', '.join(keys[:4]),
                                                   ', ...' if len(keys) > 4 else ''))
        raise UserError('{} {} does not fit the model of --config: {}; check that the config '
                        'and weights match (same model and num_classes)'.format(
                            flag, path, '; '.join(parts)))
    bad = {m.split(' ')[0] for m in mismatched}
    with warnings.catch_warnings():  # paddle warns per skipped key; the report says it once
        warnings.simplefilter('ignore')
        model.set_state_dict({k: v for k, v in state.items() if k in own and k not in bad})
    return report


def _plain(obj: Any) -> Any:
    """numpy values (an AMP loss scale, a metric) as JSON numbers and lists."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f'{type(obj).__name__} cannot be written to a training state')


def write_dir_atomic(final: str, files: Dict[str, object]) -> None:
    """Writes {name: object-or-callable(path)} as the folder `final`, atomically
    (fileio.atomic_dir): .json names as JSON, other objects paddle.save'd."""
    def fill(tmp: str) -> None:
        for name, obj in files.items():
            target = os.path.join(tmp, name)
            if callable(obj):
                obj(target)
            elif name.endswith('.json'):
                with open(target, 'w') as f:
                    json.dump(obj, f, indent=1, default=_plain)
            else:
                paddle.save(obj, target)
    atomic_dir(final, fill)


class _PlainUnpickler(pickle.Unpickler):
    """Reads a pickle that holds only plain data (dicts, lists, numbers, strings); anything
    that would import or call code is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f'{module}.{name} is not plain data')


def read_state(path: str) -> Tuple[Any, str]:
    """The training state of a checkpoint folder and the file it came from: train_state.json,
    or an older run's train_state.pkl read as plain data only."""
    json_path, pkl_path = os.path.join(path, STATE), os.path.join(path, LEGACY_STATE)
    if os.path.isfile(json_path):
        with open(json_path) as f:
            return json.load(f), STATE
    if not os.path.isfile(pkl_path):
        raise UserError(f'--resume_model {path}: {STATE} is missing, the checkpoint is incomplete; '
                        'resume from another iter_N folder')
    with open(pkl_path, 'rb') as f:
        data = f.read()
    try:
        return _PlainUnpickler(io.BytesIO(data)).load(), LEGACY_STATE
    except pickle.UnpicklingError as e:
        if 'is not plain data' in str(e):
            raise UserError(f'--resume_model {path}: {LEGACY_STATE} holds more than plain data '
                            f'({e}), so it is '
                            'not loaded; resume from a checkpoint with train_state.json or '
                            'start a new run') from e
        raise


def save_checkpoint(path: str, model: paddle.nn.Layer,
                    optimizer: Optional[paddle.optimizer.Optimizer] = None,
                    scheduler: Optional[paddle.optimizer.lr.LRScheduler] = None,
                    state: Optional[TrainState] = None,
                    extra: Optional[Dict[str, object]] = None) -> None:
    """Writes a checkpoint folder atomically; with optimizer and state it is resumable.
    `extra` adds {file name: state dict} (e.g. EMA weights)."""
    files: Dict[str, object] = {PARAMS: model.state_dict()}
    files.update(extra or {})
    if optimizer is not None:
        opt_state = dict(optimizer.state_dict())
        if scheduler is not None:  # paddle adds it when the LR is a scheduler; be explicit
            opt_state['LR_Scheduler'] = scheduler.state_dict()
        files[OPT] = opt_state
    if state is not None:
        files[STATE] = dict(state)
    write_dir_atomic(path, files)


def load_checkpoint(path: str) -> Resume:
    """The parts of a resumable checkpoint folder; a one-line error if it is incomplete."""
    if not os.path.isdir(path):
        raise UserError(f'--resume_model {path} is not a checkpoint folder; pass an iter_N folder '
                        'of a previous run')
    for name in (PARAMS, OPT):
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f'--resume_model {path}: {name} is missing, the checkpoint is '
                            'incomplete; resume from another iter_N folder')
    try:
        state, state_file = read_state(path)
        opt_state = paddle.load(os.path.join(path, OPT))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'--resume_model {path} is corrupt ({type(e).__name__}); resume from '
                        'another iter_N folder') from e
    if not isinstance(state, dict) or 'iter' not in state:
        raise UserError(f'--resume_model {path}: {state_file} is not a training state; resume '
                        'from another iter_N folder')
    return Resume(os.path.join(path, PARAMS), dict(opt_state), cast(TrainState, state))


def iter_checkpoints(save_dir: str) -> List[str]:
    """iter_N folders of save_dir, oldest first."""
    found = []
    for path in glob.glob(os.path.join(save_dir, 'iter_*')):
        tail = os.path.basename(path)[len('iter_'):]
        if tail.isdigit() and os.path.isdir(path):
            found.append((int(tail), path))
    return [p for _, p in sorted(found)]


def prune_checkpoints(save_dir: str, keep: int, protect: Iterable[str] = ()) -> None:
    """Keeps the newest `keep` iter_N folders (keep <= 0 keeps all); never removes `protect`."""
    if keep <= 0:
        return
    protected = {os.path.abspath(p) for p in protect if p}
    for path in iter_checkpoints(save_dir)[:-keep]:
        if os.path.abspath(path) not in protected:
            remove_path(path)


def local_weights(location: str, key: str) -> str:
    """A local file for a weights path or URL. URLs go through paddleseg's downloader, which
    caches each under a folder named after the URL."""
    if not str(location).startswith(('http://', 'https://')):
        return location
    host = str(location).split('/')[2]
    if not can_reach((host, 443)):
        raise UserError(f'config key `{key}`: {location} cannot be downloaded (no network); '
                        'fetch it elsewhere and set the key to the local file')
    from paddleseg.utils import download_pretrained_model
    return download_pretrained_model(location)


def load_pretrained(model: paddle.nn.Layer, cfg: Yaml) -> bool:
    """Loads `model.pretrained` / `model.backbone.pretrained` into the matching sublayer,
    skipping unfit keys; returns whether anything was loaded."""
    found = builder.pretrained_paths(cfg)
    for sub, location in found:
        key = 'model.{}pretrained'.format(sub + '.' if sub else '')
        location = local_weights(location, key)
        target = getattr(model, sub) if sub else model
        report = load_weights(target, location, allow_partial=True, flag=key)
        logger.info('Loaded %s from %s (%d missing, %d unexpected, %d mismatched keys skipped)',
                    key, location, len(report['missing']), len(report['unexpected']),
                    len(report['mismatched']))
    return bool(found)


def weights_path(model_path: Optional[str], cfg: Yaml, config: str) -> str:
    """--model_path (checked to exist, before any work), else the config's
    `model.pretrained` (PaddleSeg's fallback)."""
    if model_path:
        params_file(model_path)
        return model_path
    pretrained = cfg['model'].get('pretrained')
    if pretrained:
        logger.info('No --model_path: using model.pretrained %s of the config', pretrained)
        return local_weights(pretrained, 'model.pretrained')
    raise UserError('no weights to load: pass --model_path <model.pdparams> or set '
                    f'`model.pretrained` in {config}')
