"""The QAT wrapper: quantization config, layer-skip policy, quantize, and the one place that
builds a model, quantizes it and loads weights for qat_train, qat_val and qat_export."""
import copy
import fnmatch
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from segslim import builder
from segslim._paddle import paddle
from segslim.config import Yaml
from segslim.errors import UserError
from segslim.fileio import write_text
from segslim.logger import logger
from segslim.program import DEFAULT_INT8_OPS, ONEDNN_INT8_OPS
from segslim.train.checkpoint import load_weights

# The reference QAT setup (PaddleSeg deploy/slim/quant); `quant_config:` in the YAML
# overrides any key.
DEFAULT_QUANT_CONFIG: Yaml = {
    'weight_quantize_type': 'channel_wise_abs_max',
    'activation_quantize_type': 'moving_average_abs_max',
    'weight_bits': 8,
    'activation_bits': 8,
    'moving_rate': 0.9,
    'quantizable_layer_type': ['Conv2D', 'Linear'],
    'onnx_format': True,
    # 'backbone': only layers under `backbone` when the model has one, else all;
    # 'all': every quantizable layer.
    'layers': 'backbone',
    # fnmatch patterns of layer names never to quantize, e.g. ['head.*', '*.cls'].
    'skip': [],
    # Op types the oneDNN engine runs in INT8 (written to deploy.yaml). Convolutions by
    # default; transformers gain from fc/matmul too (see configs/segformer).
    'int8_ops': list(DEFAULT_INT8_OPS),
    # What the deployed oneDNN INT8 engine is promised to run in INT8, as shares of its
    # convolutions and matrix products (tests/test_zoo.py checks every shipped config).
    'int8_share': {'conv': 0.0, 'matmul': 0.0},
}
WEIGHT_TYPES = ('abs_max', 'channel_wise_abs_max', 'range_abs_max', 'moving_average_abs_max')
ACT_TYPES = ('abs_max', 'range_abs_max', 'moving_average_abs_max')
LAYER_TYPES = {'Conv2D': paddle.nn.Conv2D, 'Linear': paddle.nn.Linear,
               'Conv2DTranspose': paddle.nn.Conv2DTranspose}


def quant_config_of(cfg: Yaml) -> Yaml:
    """The checked QAT settings: defaults overridden by the config's `quant_config`."""
    user = cfg.get('quant_config') or {}
    if not isinstance(user, dict):
        raise UserError('config key `quant_config` must be a mapping')
    unknown = sorted(set(user) - set(DEFAULT_QUANT_CONFIG))
    if unknown:
        raise UserError('config key `quant_config.{}` is unknown; known: {}'.format(
            unknown[0], ', '.join(DEFAULT_QUANT_CONFIG)))
    qcfg = copy.deepcopy(DEFAULT_QUANT_CONFIG)
    qcfg.update(copy.deepcopy(user))
    checks = [
        ('weight_quantize_type', qcfg['weight_quantize_type'] in WEIGHT_TYPES, WEIGHT_TYPES),
        ('activation_quantize_type', qcfg['activation_quantize_type'] in ACT_TYPES, ACT_TYPES),
        ('weight_bits', qcfg['weight_bits'] in range(2, 17), '2..16'),
        ('activation_bits', qcfg['activation_bits'] in range(2, 17), '2..16'),
        ('moving_rate', isinstance(qcfg['moving_rate'], (int, float)) and
         0 < qcfg['moving_rate'] < 1, '(0, 1)'),
        ('quantizable_layer_type', isinstance(qcfg['quantizable_layer_type'], list) and
         all(t in LAYER_TYPES for t in qcfg['quantizable_layer_type']), list(LAYER_TYPES)),
        ('layers', qcfg['layers'] in ('backbone', 'all'), ('backbone', 'all')),
        ('skip', isinstance(qcfg['skip'], list) and all(isinstance(v, str)
                                                        for v in qcfg['skip']),
         'a list of layer-name patterns (strings)'),
        ('onnx_format', isinstance(qcfg['onnx_format'], bool), 'True or False'),
        ('int8_ops', isinstance(qcfg['int8_ops'], list) and qcfg['int8_ops'] and
         set(qcfg['int8_ops']) <= set(ONEDNN_INT8_OPS), list(ONEDNN_INT8_OPS)),
        ('int8_share', isinstance(qcfg['int8_share'], dict) and
         set(qcfg['int8_share']) <= {'conv', 'matmul'} and
         all(isinstance(v, (int, float)) and 0 <= v <= 1
             for v in qcfg['int8_share'].values()),
         '{conv: 0..1, matmul: 0..1}'),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise UserError(f'config key `quant_config.{key}`: {qcfg[key]!r} is not allowed; use '
                            f'{allowed}')
    qcfg['moving_rate'] = float(qcfg['moving_rate'])
    return qcfg


def quant_plan(model: paddle.nn.Layer, qcfg: Yaml) -> List[Tuple[str, str, str]]:
    """[(layer name, layer type, rule)] for every quantizable layer, in model order; rule is
    'quantized' or what skips it: the `layers: backbone` policy or the first matching
    `skip` pattern."""
    types = tuple(LAYER_TYPES[t] for t in qcfg['quantizable_layer_type'])
    only_backbone = qcfg['layers'] == 'backbone' and hasattr(model, 'backbone')
    plan = []
    for name, layer in model.named_sublayers():
        if not isinstance(layer, types):
            continue
        rule = 'quantized'
        if only_backbone and not name.startswith('backbone.'):
            rule = 'skipped: outside the backbone (quant_config.layers: backbone)'
        else:
            pattern = next((p for p in qcfg['skip'] if fnmatch.fnmatch(name, p)), None)
            if pattern is not None:
                rule = f'skipped: quant_config.skip {pattern!r}'
        plan.append((name, type(layer).__name__, rule))
    return plan


SUMMARY_FILE = 'quant_summary.txt'


def log_quant_summary(plan: List[Tuple[str, str, str]], what: str,
                      summary_dir: Optional[str] = None) -> Optional[str]:
    """Logs one line (how many layers are quantized, how many each rule skipped) and, with
    `summary_dir`, writes every layer with its rule to <summary_dir>/quant_summary.txt, so
    a skip list visibly took effect; returns that file's path."""
    quantized = sum(rule == 'quantized' for _, _, rule in plan)
    by_rule: Dict[str, int] = {}
    for _, _, rule in plan:
        if rule != 'quantized':
            key = rule.split(' (')[0].split(" '")[0].replace('skipped: ', '')
            by_rule[key] = by_rule.get(key, 0) + 1
    head = '{}: quantizing {} of {} layers, skipping {}{}'.format(
        what, quantized, len(plan), len(plan) - quantized, ' ({})'.format(', '.join(
            f'{rule}: {n}' for rule, n in by_rule.items())) if by_rule else '')
    path = None
    if summary_dir:
        width = max(len(name) for name, _, _ in plan)
        lines = [head] + ['  {:<{}}  {:<16} {}'.format(name, width, kind, rule)
                          for name, kind, rule in plan]
        os.makedirs(summary_dir, exist_ok=True)
        path = os.path.join(summary_dir, SUMMARY_FILE)
        write_text(path, '\n'.join(lines) + '\n')
        head += f' (every layer: {path})'
    logger.info(head)
    return path


def mark_skipped(model: paddle.nn.Layer, qcfg: Yaml) -> Tuple[List[str], List[str]]:
    """Sets `skip_quant` on quantizable layers the policy leaves out; returns
    (names to quantize, names skipped)."""
    layers = dict(model.named_sublayers())
    quantized: List[str] = []
    skipped: List[str] = []
    for name, _, rule in quant_plan(model, qcfg):
        layers[name].skip_quant = rule != 'quantized'
        (skipped if layers[name].skip_quant else quantized).append(name)
    return quantized, skipped


def quantize_model(model: paddle.nn.Layer, qcfg: Yaml, summary: bool = True,
                   summary_dir: Optional[str] = None):
    """Inserts fake-quant layers in place; returns the PaddleSlim QAT object (for export).
    `summary` logs the quant summary (with its table in `summary_dir`)."""
    from paddleslim import QAT
    plan = quant_plan(model, qcfg)
    quantized, _ = mark_skipped(model, qcfg)
    if not quantized:
        raise UserError('config key `quant_config`: no layer is left to quantize (layers: {}, '
                        'skip: {}); loosen the policy'.format(qcfg['layers'], qcfg['skip']))
    if summary:
        log_quant_summary(plan, 'QAT ({})'.format('/'.join(qcfg['quantizable_layer_type'])),
                          summary_dir)
    slim_cfg = {k: v for k, v in qcfg.items()
                if k not in ('layers', 'skip', 'int8_ops', 'int8_share')}
    quanter = QAT(config=slim_cfg)
    quanter.quantize(model)
    return quanter


def calibrate(model: paddle.nn.Layer, batches: Sequence[Any]) -> None:
    """Moving-average activation scales of a fake-quant model from N,C,H,W float32 arrays:
    the fake-quant layers record them in train mode, batch norm keeps its statistics frozen
    so the quantized model matches the FP32 one. Each average starts from the first batch:
    the observers' initial state (an absolute maximum of 1) would otherwise set the scale of
    activations far below 1, whose values then all round to zero. Leaves the model in eval
    mode."""
    model.train()
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase):
            layer.eval()
        for name in ('_state', '_accum'):  # moving-average observers (PaddleSlim's QAT)
            value = getattr(layer, name, None)
            if isinstance(value, paddle.Tensor) and tuple(value.shape) == (1,):
                value.set_value(np.zeros([1], dtype=value.numpy().dtype))
    with paddle.no_grad():
        for x in batches:
            model(paddle.to_tensor(x))
    model.eval()


def build_quant_model(cfg: Yaml, fp32_weights: Optional[str] = None,
                      qat_weights: Optional[str] = None, allow_partial: bool = False,
                      summary_dir: Optional[str] = None):
    """Builds the config's model, loads FP32 weights (before quantizing) or QAT weights
    (after), and returns (quantized model, QAT object)."""
    model = builder.build_model(cfg)
    if fp32_weights is not None:
        load_weights(model, fp32_weights, allow_partial=allow_partial)
    quanter = quantize_model(model, quant_config_of(cfg), summary_dir=summary_dir)
    if qat_weights is not None:
        load_weights(model, qat_weights, allow_partial=allow_partial)
    return model, quanter
