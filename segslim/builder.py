"""Builds models, datasets, transforms, losses, optimizers and LR schedules from a config.

`type:` names resolve against paddleseg's component managers and paddle's schedulers.
Building never loads weights: see segslim.train.checkpoint for that.
"""
import copy
import difflib
import os
from typing import Any, Dict, List, Optional, Tuple

import paddleseg  # noqa: F401  (registers every component with the managers)
from paddleseg.cvlibs import manager

from segslim._paddle import paddle
from segslim.compat import patch_paddleseg
from segslim.config import Yaml
from segslim.data.datasets import SegDataset, check_files, check_root
from segslim.decoders import with_fast_decoder
from segslim.errors import UserError

KINDS = {
    'model': manager.MODELS,
    'backbone': manager.BACKBONES,
    'dataset': manager.DATASETS,
    'transform': manager.TRANSFORMS,
    'loss': manager.LOSSES,
    'optimizer': manager.OPTIMIZERS,
}
patch_paddleseg(paddle.__version__)
# PaddleSeg's builder looks a nested `type:` up in these registries, in this order.
SEARCH_ORDER = ('model', 'backbone', 'dataset', 'transform', 'loss', 'optimizer')


def lookup(kind: str, name: str, key: str) -> Any:
    """The class registered as `name` for `kind` ('any': the first registry that has it, as
    PaddleSeg does for nested components); an unknown name lists the closest ones."""
    kinds = SEARCH_ORDER if kind == 'any' else (kind,)
    for k in kinds:
        if name in KINDS[k].components_dict:
            return KINDS[k].components_dict[name]
    known = sorted({n for k in kinds for n in KINDS[k].components_dict})
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.4)
    hint = ('did you mean {}?'.format(', '.join(close)) if close else
            'known: {}'.format(', '.join(known[:12]) + ', ...'))
    raise UserError('config key `{}`: unknown {} type {!r}; {}'.format(
        key, 'component' if kind == 'any' else kind, name, hint))


def is_component(value: Any) -> bool:
    return isinstance(value, dict) and 'type' in value


def build_component(kind: str, cfg: Yaml, key: str, **extra: Any) -> Any:
    """Instantiates `{type: Name, **kwargs}`. As in PaddleSeg, every argument that is itself a
    `{type: ...}` mapping, or a list holding such mappings, is built first, wherever it
    stands (a backbone, a head, MixedLoss's `losses`, a loss inside a loss)."""
    cfg = copy.deepcopy(cfg)
    cls = lookup(kind, cfg.pop('type'), key + '.type')
    for name, value in list(cfg.items()):
        if name in extra:
            continue
        if is_component(value):
            cfg[name] = build_component('any', value, key + '.' + name)
        elif isinstance(value, list) and any(is_component(v) for v in value):
            cfg[name] = [build_component('any', v, f'{key}.{name}[{i}]')
                         if is_component(v) else v for i, v in enumerate(value)]
    cfg.update(extra)
    try:
        return cls(**cfg)
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        # paddleseg components check their arguments with assert / ValueError
        detail = str(e).strip().splitlines()
        raise UserError(f'config key `{key}`: cannot build {cls.__name__} '
                        f'({detail[-1] if detail else type(e).__name__}); check its '
                        'arguments') from e


def _without_pretrained(cfg: Yaml) -> Yaml:
    cfg = copy.deepcopy(cfg)
    cfg.pop('pretrained', None)
    if isinstance(cfg.get('backbone'), dict):
        cfg['backbone'].pop('pretrained', None)
    return cfg


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f'config key `{key}` must be an integer, got {value!r}')
    return value


def num_classes_of(cfg: Yaml) -> int:
    """num_classes from the model, else the train (or val) dataset: its key or its class
    constant."""
    model_cfg = cfg.get('model') or {}
    if 'num_classes' in model_cfg:
        return _as_int(model_cfg['num_classes'], 'model.num_classes')
    for key in ('train_dataset', 'val_dataset'):
        data_cfg = cfg.get(key)
        if not data_cfg:
            continue
        if 'num_classes' in data_cfg:
            return _as_int(data_cfg['num_classes'], key + '.num_classes')
        cls = lookup('dataset', data_cfg['type'], key + '.type')
        if hasattr(cls, 'NUM_CLASSES'):
            return int(cls.NUM_CLASSES)
    raise UserError('config: set `model.num_classes` (no dataset of the config defines it)')


def ignore_index_of(cfg: Yaml, key: str = 'train_dataset') -> int:
    data_cfg = cfg[key]
    if 'ignore_index' in data_cfg:
        return _as_int(data_cfg['ignore_index'], key + '.ignore_index')
    cls = lookup('dataset', data_cfg['type'], key + '.type')
    return int(getattr(cls, 'IGNORE_INDEX', 255))


def build_model(cfg: Yaml) -> paddle.nn.Layer:
    """The segmentation network with random weights (`pretrained` keys are not loaded here)."""
    model_cfg = _without_pretrained(cfg['model'])
    model_cfg['num_classes'] = num_classes_of(cfg)
    return with_fast_decoder(build_component('model', model_cfg, 'model'))


def pretrained_paths(cfg: Yaml) -> List[Tuple[str, str]]:
    """[(sublayer name or '', path or URL)] from model.pretrained / model.backbone.pretrained."""
    found = []
    model_cfg = cfg['model']
    if isinstance(model_cfg.get('backbone'), dict) and model_cfg['backbone'].get('pretrained'):
        found.append(('backbone', model_cfg['backbone']['pretrained']))
    if model_cfg.get('pretrained'):
        found.append(('', model_cfg['pretrained']))
    return found


def build_transforms(items: Optional[List[Yaml]], key: str) -> list:
    if items is None:
        return []
    if not isinstance(items, list):
        raise UserError(f'config key `{key}`: transforms must be a list of {{type: ...}}')
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or 'type' not in item:
            raise UserError(f'config key `{key}[{i}]`: expected {{type: Name, ...}}')
        out.append(build_component('transform', item, f'{key}[{i}]'))
    return out


def _with_ignore_index(item: Yaml, ignore: int, key: str) -> Yaml:
    """The loss config with the dataset's ignore_index filled in where the loss takes one,
    inner losses of MixedLoss included (as PaddleSeg's builder does)."""
    item = dict(item)
    cls = lookup('loss', str(item.get('type')), key + '.type')
    if 'ignore_index' in cls.__init__.__code__.co_varnames:
        item.setdefault('ignore_index', ignore)
    if isinstance(item.get('losses'), list):
        item['losses'] = [_with_ignore_index(inner, ignore, f'{key}.losses[{j}]')
                          if is_component(inner) else inner
                          for j, inner in enumerate(item['losses'])]
    return item


def build_loss(cfg: Yaml) -> Dict[str, list]:
    """{'types': [loss objects, one per coef], 'coef': [...]} for multi-output models."""
    loss_cfg = cfg['loss']
    ignore = ignore_index_of(cfg)
    types = []
    for i, item in enumerate(loss_cfg['types']):
        key = f'loss.types[{i}]'
        types.append(build_component('loss', _with_ignore_index(item, ignore, key), key))
    if len(types) == 1 and len(loss_cfg['coef']) > 1:
        types = types * len(loss_cfg['coef'])
    return {'types': types, 'coef': [float(c) for c in loss_cfg['coef']]}


def build_lr_scheduler(cfg: Yaml) -> paddle.optimizer.lr.LRScheduler:
    """The LR schedule; PolynomialDecay decays over `iters` unless decay_steps is set."""
    if not cfg.get('lr_scheduler'):
        legacy = cfg.get('learning_rate')
        if not isinstance(legacy, dict) or not isinstance(legacy.get('value'), (int, float)):
            raise UserError('config key `learning_rate` must be a mapping {value: 0.01, decay: '
                            f'{{...}}}}, got {legacy!r}; or use `lr_scheduler:`')
        value = legacy['value']
        decay = legacy.get('decay', {}) or {}
        lr_cfg = {'type': 'PolynomialDecay', 'learning_rate': value,
                  'power': decay.get('power', 0.9), 'end_lr': decay.get('end_lr', 0.0)}
    else:
        lr_cfg = copy.deepcopy(cfg['lr_scheduler'])
    lr_type = lr_cfg.pop('type')
    warmup_iters = lr_cfg.pop('warmup_iters', 0)
    warmup_start = lr_cfg.pop('warmup_start_lr', 0.0)
    if lr_type == 'PolynomialDecay':
        lr_cfg.setdefault('decay_steps', max(cfg['iters'] - warmup_iters, 1))
    cls = getattr(paddle.optimizer.lr, lr_type, None)
    if cls is None or not isinstance(cls, type):
        raise UserError(f'config key `lr_scheduler.type`: unknown scheduler {lr_type!r}')
    try:
        sched = cls(**lr_cfg)
    except TypeError as e:
        raise UserError(f'config key `lr_scheduler`: cannot build {lr_type} ({e})') from e
    if warmup_iters and warmup_start >= lr_cfg['learning_rate']:
        raise UserError(f'config key `lr_scheduler.warmup_start_lr` ({warmup_start}) must be '
                        f'below `lr_scheduler.learning_rate` ({lr_cfg["learning_rate"]}); lower it')
    if warmup_iters:
        sched = paddle.optimizer.lr.LinearWarmup(sched, warmup_iters, warmup_start,
                                                 lr_cfg['learning_rate'])
    return sched


def build_optimizer(cfg: Yaml, model: paddle.nn.Layer,
                    lr: paddle.optimizer.lr.LRScheduler) -> paddle.optimizer.Optimizer:
    """PaddleSeg semantics: `SGD` with `momentum` means Momentum."""
    opt_cfg = copy.deepcopy(cfg['optimizer'])
    opt_cfg['type'] = {'sgd': 'SGD', 'adam': 'Adam'}.get(opt_cfg['type'], opt_cfg['type'])
    if opt_cfg['type'] == 'SGD' and 'momentum' in opt_cfg:
        opt_cfg['type'] = 'Momentum'
    if isinstance(opt_cfg.get('weight_decay'), int):
        opt_cfg['weight_decay'] = float(opt_cfg['weight_decay'])
    factory = build_component('optimizer', opt_cfg, 'optimizer')
    return factory(model, lr)


def build_dataset(cfg: Yaml, key: str, seed: int = 0) -> SegDataset:
    """The checked dataset for config key 'train_dataset' or 'val_dataset'."""
    if not cfg.get(key):
        raise UserError(f'config: required key `{key}` is missing; add it (see '
                        'configs/quick_start/bisenet_optic_disc_512x512_1k.yml)')
    data_cfg = dict(cfg[key])
    default_mode = 'train' if key == 'train_dataset' else 'val'
    mode = str(data_cfg.get('mode', default_mode)).lower()
    data_cfg['mode'] = mode
    for name in ('train_path', 'val_path', 'test_path'):
        path = data_cfg.get(name)
        if path is not None and not os.path.isfile(path) and name.startswith(mode):
            raise UserError(f'config key `{key}.{name}`: file list {path} does not exist; create '
                            'it or fix the path')
    check_root(data_cfg, key)
    transforms = build_transforms(data_cfg.get('transforms'), key + '.transforms')
    try:
        ds = build_component('dataset', data_cfg, key, transforms=transforms)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(f'config key `{key}`: {str(e).splitlines()[0]}') from e
    except Exception as e:  # paddleseg raises bare Exception for malformed list lines
        if type(e) is not Exception:
            raise
        raise UserError(f'config key `{key}`: {str(e).splitlines()[0]}') from e
    file_list = [(img, lab) for img, lab in ds.file_list]
    if not file_list:
        raise UserError(f'config key `{key}`: the {mode} list of {ds.dataset_root} is empty; add '
                        'lines "image.jpg label.png"')
    check_files(file_list, key)
    return SegDataset(file_list, transforms, num_classes_of(cfg),
                      getattr(ds, 'ignore_index', 255), mode, key, seed)
