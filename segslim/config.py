"""PaddleSeg-style YAML configs: `_base_` inheritance, command-line overrides, validation.

Precedence, lowest first: built-in defaults < YAML (a child file wins over its
`_base_`) < the --iters/--batch_size/--learning_rate flags < --opts key=value.
"""
import ast
import copy
import os
from typing import Any, Dict, List, Optional, Sequence

import yaml

from segslim.errors import UserError
from segslim.fileio import write_text

# A mapping read from a PaddleSeg YAML config or one of its sections (model, datasets and
# their transforms, loss, optimizer, quant_config, export): its keys are whatever the zoo's
# components take, so no schema is imposed beyond `validate`.
Yaml = Dict[str, Any]

BASE_KEY = '_base_'
INHERIT_KEY = '_inherited_'

DEFAULTS: Yaml = {'batch_size': 1, 'iters': 1000}
KNOWN_KEYS = ('batch_size', 'iters', 'train_dataset', 'val_dataset', 'test_dataset',
              'optimizer', 'lr_scheduler', 'learning_rate', 'loss', 'model', 'export',
              'test_config', 'quant_config', 'distill_loss')
# What each kind of script reads from a config (a key a script does not use is never
# required): training needs the full recipe, val_dataset only with --do_eval.
TRAIN_KEYS = ('model', 'train_dataset', 'loss', 'optimizer', 'lr_scheduler')
EVAL_KEYS = ('model', 'val_dataset')
EXPORT_KEYS = ('model',)
REQUIRED_KEYS = TRAIN_KEYS + ('val_dataset',)


def load_yaml(path: str, _chain: Sequence[str] = ()) -> Yaml:
    """Reads one YAML file and everything it inherits through `_base_`."""
    path = os.path.abspath(path)
    if path in _chain:
        cycle = ' -> '.join(os.path.relpath(p) for p in list(_chain) + [path])
        raise UserError(f'config {os.path.relpath(path)}: `_base_` is cyclic ({cycle}); remove '
                        'one of the links')
    if not os.path.isfile(path):
        if _chain:
            raise UserError(f'config {os.path.relpath(_chain[-1])}: `_base_` file '
                            f'{os.path.relpath(path)} does not exist; fix the path (it is '
                            'relative to the child file)')
        raise UserError(f'config file {os.path.relpath(path)} does not exist; pass --config with '
                        'a .yml file')
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise UserError(f'config {os.path.relpath(path)}{where}: YAML syntax error ({problem}); '
                        'fix the file') from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'config {os.path.relpath(path)}: cannot read ({e})') from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f'config {os.path.relpath(path)}: the top level must be a mapping of '
                        f'keys, got {type(data).__name__}')
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    merged: Yaml = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), str(base))
        merged = merge(merged, load_yaml(base_path, list(_chain) + [path]))
    return merge(merged, data)


def merge(base: Yaml, child: Yaml) -> Yaml:
    """Child wins; dicts merge recursively, lists and scalars replace; a child dict with
    `_inherited_: False` replaces the base dict whole."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = dict(value)
            if value.pop(INHERIT_KEY, True):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        else:
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != INHERIT_KEY}
            out[key] = copy.deepcopy(value)
    return out


def parse_opts(opts: Optional[List[str]]) -> Yaml:
    """Turns ['a.b=1', 'c=x'] into {'a.b': 1, 'c': 'x'}; values are Python literals or strings."""
    parsed: Yaml = {}
    for item in opts or []:
        if '=' not in item or not item.split('=', 1)[0].strip():
            raise UserError(f'--opts {item!r}: expected key.sub=value')
        key, raw = item.split('=', 1)
        key = key.strip()
        if any(not part for part in key.split('.')):
            raise UserError(f'--opts {item!r}: empty part in the key {key!r}')
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        parsed[key] = value
    return parsed


def set_by_path(cfg: Yaml, dotted: str, value: Any) -> None:
    """Sets cfg['a']['b'] for 'a.b'; the top-level key must be known and parents must exist."""
    parts = dotted.split('.')
    if parts[0] not in KNOWN_KEYS:
        raise UserError('--opts {}: unknown key {!r}; known top-level keys: {}'.format(
            dotted, parts[0], ', '.join(KNOWN_KEYS)))
    node = cfg
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict) or part not in node:
            if isinstance(node, dict) and depth == 0:
                node[part] = {}
            else:
                raise UserError('--opts {}: {!r} does not exist in the config; check the key '
                                'path'.format(dotted, '.'.join(parts[:depth + 1])))
        node = node[part]
    leaf = parts[-1]
    if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
        node[int(leaf)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise UserError('--opts {}: {!r} is not a mapping'.format(dotted, '.'.join(parts[:-1])))


def load_config(path: str, iters: Optional[int] = None, batch_size: Optional[int] = None,
                learning_rate: Optional[float] = None, opts: Optional[List[str]] = None,
                required: Sequence[str] = REQUIRED_KEYS) -> Yaml:
    """The resolved config dict: defaults, YAML, flags and --opts in that order; `required`
    names the top-level keys the calling script uses."""
    cfg = merge(DEFAULTS, load_yaml(path))
    if iters is not None:
        _check_positive('--iters', iters)
        cfg['iters'] = iters
    if batch_size is not None:
        _check_positive('--batch_size', batch_size)
        cfg['batch_size'] = batch_size
    if learning_rate is not None:
        _check_positive('--learning_rate', learning_rate)
        if isinstance(cfg.get('lr_scheduler'), dict):
            sched = cfg['lr_scheduler']
            start, old = sched.get('warmup_start_lr'), sched.get('learning_rate')
            if sched.get('warmup_iters') and isinstance(start, (int, float)) and \
                    start >= learning_rate and isinstance(old, (int, float)) and old > 0:
                # a warmup that would start at or above the new rate starts as far below it
                # as below the config's own (QAT fine-tunes an AdamW config at a tenth)
                sched['warmup_start_lr'] = start * learning_rate / old
            sched['learning_rate'] = learning_rate
        else:
            cfg['learning_rate'] = {'value': learning_rate}
    for key, value in parse_opts(opts).items():
        set_by_path(cfg, key, value)
    validate(cfg, path, required)
    return cfg


def _check_positive(flag: str, value: Any) -> None:
    if value <= 0:
        raise UserError(f'{flag} must be positive, got {value}')


def validate(cfg: Yaml, path: str = '<config>',
             required: Sequence[str] = REQUIRED_KEYS) -> None:
    """Checks the keys a script relies on (and the form of those present); names the file
    and the key."""
    name = os.path.relpath(path) if os.path.exists(path) else path
    for key in required:
        if key == 'lr_scheduler' and 'learning_rate' in cfg:
            continue
        if not cfg.get(key):
            raise UserError(f'config {name}: required key `{key}` is missing; add it (see '
                            'configs/quick_start/bisenet_optic_disc_512x512_1k.yml)')
    for key in ('model', 'train_dataset', 'val_dataset', 'optimizer', 'lr_scheduler'):
        value = cfg.get(key)
        if value is not None and not (isinstance(value, dict) and 'type' in value):
            raise UserError(f'config {name}: `{key}` needs a `type:` entry')
    for key in ('iters', 'batch_size'):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f'config {name}: `{key}` must be a positive integer, got {value!r}')
    if 'loss' in required or cfg.get('loss') is not None:
        validate_loss(cfg.get('loss'), name)


def validate_loss(loss: Any, name: str) -> None:
    if not isinstance(loss, dict) or not loss.get('types') or not loss.get('coef'):
        raise UserError(f'config {name}: `loss` needs `types` and `coef` lists')
    if not isinstance(loss['types'], list) or not isinstance(loss['coef'], list):
        raise UserError(f'config {name}: `loss.types` and `loss.coef` must be lists')
    for i, item in enumerate(loss['types']):
        if not isinstance(item, dict) or 'type' not in item:
            raise UserError(f'config {name}: `loss.types[{i}]` must be a mapping with a `type:` '
                            f'entry, got {item!r}')
    for i, coef in enumerate(loss['coef']):
        if isinstance(coef, bool) or not isinstance(coef, (int, float)):
            raise UserError(f'config {name}: `loss.coef[{i}]` must be a number, got {coef!r}')
    if len(loss['types']) not in (1, len(loss['coef'])):
        raise UserError('config {}: `loss.types` has {} entries and `loss.coef` {}; give one '
                        'type or one per coef'.format(name, len(loss['types']),
                                                      len(loss['coef'])))


def save_config(cfg: Yaml, save_dir: str) -> str:
    """Writes the resolved config as <save_dir>/config.yaml (atomically); returns its path."""
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, 'config.yaml')
    write_text(path, yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
    return path


def apply_data_format(cfg: Yaml, data_format: str) -> None:
    """--data_format NHWC, as PaddleSeg 2.8 supports it: DeepLabV3P only, set on the model,
    its backbone and the losses; the loops transpose the NCHW batches."""
    if data_format == 'NCHW':
        return
    if cfg['model'].get('type') != 'DeepLabV3P':
        raise UserError('--data_format NHWC supports DeepLabV3P only (as PaddleSeg); config '
                        'model.type is {}'.format(cfg['model'].get('type')))
    cfg['model']['data_format'] = data_format
    if isinstance(cfg['model'].get('backbone'), dict):
        cfg['model']['backbone']['data_format'] = data_format
    for item in (cfg.get('loss') or {}).get('types') or []:
        if isinstance(item, dict):
            item['data_format'] = data_format
