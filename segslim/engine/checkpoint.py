"""Checkpoint io: atomic writes, strict weight loading, resume state, pruning.

A checkpoint folder (`iter_N/`, `best_model/`) holds model.pdparams, and for resumable
ones model.pdopt (optimizer + LR scheduler) and train_state.pkl (iteration, best metric,
seed, resolved config). Folders are written with fileio.atomic_dir, so a kill at any
moment leaves every complete checkpoint intact (fileio.recover cleans up after one).
"""
import glob
import os
import pickle
import warnings
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from segslim._paddle import paddle
from segslim.errors import UserError
from segslim.fileio import atomic_dir, remove_path

PARAMS = 'model.pdparams'
OPT = 'model.pdopt'
STATE = 'train_state.pkl'


def read_params(path: str, flag: str = '--model_path') -> Dict[str, np.ndarray]:
    """The state dict stored in a .pdparams file, or a one-line error naming the file."""
    if os.path.isdir(path):
        path = os.path.join(path, PARAMS)
    if not os.path.isfile(path):
        raise UserError('{} {} does not exist; pass a model.pdparams written by train.py '
                        'or qat_train.py'.format(flag, path))
    try:
        state = paddle.load(path, return_numpy=True)
    except Exception as e:  # paddle raises many types for a bad file
        raise UserError('{} {} is not a Paddle params file ({}); pass a model.pdparams '
                        'written by train.py or qat_train.py'.format(
                            flag, path, type(e).__name__))
    if not isinstance(state, dict) or not state or not all(
            hasattr(v, 'shape') for v in state.values()):
        raise UserError('{} {} holds no model weights; pass a model.pdparams written by '
                        'train.py or qat_train.py'.format(flag, path))
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
    mismatched = ['{} {}->{}'.format(k, list(state[k].shape), list(own[k].shape))
                  for k in own if k in state and list(state[k].shape) != list(own[k].shape)]
    report = {'missing': missing, 'unexpected': unexpected, 'mismatched': mismatched}
    if (missing or unexpected or mismatched) and not allow_partial:
        if is_quantized(own) and not is_quantized(state):
            raise UserError('{} {} holds FP32 weights but this model is quantized; run '
                            'slim/quant/qat_train.py first and pass its '
                            'best_model/model.pdparams'.format(flag, path))
        if is_quantized(state) and not is_quantized(own):
            raise UserError('{} {} holds QAT (quantized) weights; use the slim/quant/qat_*.py '
                            'scripts for them'.format(flag, path))
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


def write_dir_atomic(final: str, files: Dict[str, Any]) -> None:
    """Writes {name: object-or-callable(path)} as the folder `final`, atomically
    (fileio.atomic_dir): .pkl names are pickled, other objects paddle.save'd."""
    def fill(tmp: str) -> None:
        for name, obj in files.items():
            target = os.path.join(tmp, name)
            if callable(obj):
                obj(target)
            elif name.endswith('.pkl'):
                with open(target, 'wb') as f:
                    pickle.dump(obj, f)
            else:
                paddle.save(obj, target)
    atomic_dir(final, fill)


def save_checkpoint(path: str, model: paddle.nn.Layer,
                    optimizer: Optional[paddle.optimizer.Optimizer] = None,
                    scheduler: Optional[paddle.optimizer.lr.LRScheduler] = None,
                    state: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> None:
    """Writes a checkpoint folder atomically; with optimizer and state it is resumable.
    `extra` adds {file name: state dict} (e.g. EMA weights)."""
    files: Dict[str, Any] = {PARAMS: model.state_dict()}
    files.update(extra or {})
    if optimizer is not None:
        opt_state = dict(optimizer.state_dict())
        if scheduler is not None:  # paddle adds it when the LR is a scheduler; be explicit
            opt_state['LR_Scheduler'] = scheduler.state_dict()
        files[OPT] = opt_state
    if state is not None:
        files[STATE] = dict(state)
    write_dir_atomic(path, files)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The parts of a resumable checkpoint folder; a one-line error if it is incomplete."""
    if not os.path.isdir(path):
        raise UserError('--resume_model {} is not a checkpoint folder; pass an iter_N folder '
                        'of a previous run'.format(path))
    for name in (PARAMS, OPT, STATE):
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError('--resume_model {}: {} is missing, the checkpoint is incomplete; '
                            'resume from another iter_N folder'.format(path, name))
    try:
        with open(os.path.join(path, STATE), 'rb') as f:
            state = pickle.load(f)
        opt_state = paddle.load(os.path.join(path, OPT))
    except Exception as e:
        raise UserError('--resume_model {} is corrupt ({}); resume from another iter_N '
                        'folder'.format(path, type(e).__name__))
    if not isinstance(state, dict) or 'iter' not in state:
        raise UserError('--resume_model {}: {} is not a training state; resume from another '
                        'iter_N folder'.format(path, STATE))
    return {'params': os.path.join(path, PARAMS), 'opt': opt_state, 'state': state}


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
