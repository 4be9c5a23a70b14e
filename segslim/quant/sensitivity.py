"""Layer sensitivity: what each quantizable layer costs when quantized alone, and what it
gives back when it alone stays FP32 (mIoU on val images and the SQNR of the logits against
FP32), from one calibrated fake-quant model whose layers are switched on and off; and the
greedy smallest skip set that keeps the quantized model within a mIoU budget."""
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import yaml

from segslim._paddle import paddle
from segslim.config import Yaml
from segslim.data.datasets import SegDataset
from segslim.deploy.engines import backend_label
from segslim.fileio import write_json, write_text
from segslim.logger import logger, progress
from segslim.quant.qat import calibrate, quant_plan, quantize_model
from segslim.train.evaluate import predict_sample
from segslim.train.metrics import ConfusionMatrix

# Without --max_miou_drop, layers whose quantization alone costs this much simulated mIoU
# (half a point) go to skip_layers.yml.
DEFAULT_SKIP_DROP = 0.005
CHART_LAYERS = 40  # the most sensitive layers drawn in sensitivity.png


@dataclass
class LayerSensitivity:
    name: str
    kind: str
    alone_miou: float       # only this layer quantized
    alone_sqnr: float
    kept_miou: float        # every layer quantized but this one
    kept_sqnr: float


def sqnr_db(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB, over all
    arrays (inf when they are equal)."""
    signal = sum(float(np.square(r.astype(np.float64)).sum()) for r in reference)
    noise = sum(float(np.square(t.astype(np.float64) - r).sum())
                for r, t in zip(reference, test))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def _identity(x):
    return x


class SensitivityProbe:
    """An FP32 model and its calibrated fake-quant twin, on the first `num_images` val
    images. measure(enabled) gives (mIoU, SQNR) with only the `enabled` layers quantized."""

    def __init__(self, build: Callable[[], paddle.nn.Layer], qcfg: Yaml,
                 calib_batches: Sequence[np.ndarray], dataset: SegDataset, num_images: int):
        self.dataset = dataset
        self.samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
        fp32 = build()
        fp32.eval()
        self.plan = quant_plan(fp32, qcfg)
        with paddle.no_grad():
            outs = [predict_sample(fp32, s, with_logit=True) for s in self.samples]
        self.fp32_logits = [logit for _, logit in outs]
        self.fp32_miou = self._miou([ids for ids, _ in outs])
        del fp32
        self.model = build()
        quantize_model(self.model, qcfg, summary=False)
        calibrate(self.model, calib_batches)
        layers = dict(self.model.named_sublayers())
        self.wrappers: Dict[str, Any] = {}
        for name, _, rule in self.plan:
            if rule != 'quantized':
                continue
            layer = layers.get(name + '._layer', layers.get(name))
            if hasattr(layer, '_fake_quant_input'):
                self.wrappers[name] = layer
        self.used = self._used_layers()

    def _miou(self, preds: Sequence[np.ndarray]) -> float:
        cm = ConfusionMatrix(self.dataset.num_classes, self.dataset.ignore_index)
        for pred, sample in zip(preds, self.samples):
            cm.update(pred, sample['label'])
        return cm.compute()['miou']

    def _used_layers(self) -> List[str]:
        """Quantized layers that run at inference (training-only heads do not), in order."""
        seen: List[str] = []
        hooks = [layer.register_forward_post_hook(
            lambda layer, inputs, output, name=name: seen.append(name))
            for name, layer in self.wrappers.items()]
        with paddle.no_grad():
            predict_sample(self.model, self.samples[0])
        for hook in hooks:
            hook.remove()
        return [name for name in self.wrappers if name in set(seen)]

    def set_enabled(self, enabled: Set[str]) -> None:
        for name, layer in self.wrappers.items():
            for sub in (layer._fake_quant_input, layer._fake_quant_weight):
                if name in enabled:
                    sub.__dict__.pop('forward', None)
                else:
                    sub.forward = _identity

    def measure(self, enabled: Set[str]) -> Tuple[float, float]:
        self.set_enabled(enabled)
        with paddle.no_grad():
            outs = [predict_sample(self.model, s, with_logit=True) for s in self.samples]
        return self._miou([ids for ids, _ in outs]), sqnr_db(self.fp32_logits,
                                                              [logit for _, logit in outs])

    def rank(self) -> List[LayerSensitivity]:
        """Every used layer, most sensitive first: lowest SQNR when quantized alone, then
        the largest mIoU loss."""
        kinds = {name: kind for name, kind, _ in self.plan}
        everything = set(self.used)
        rows = []
        for name in progress(self.used, 'Layer sensitivity'):
            alone = self.measure({name})
            kept = self.measure(everything - {name})
            rows.append(LayerSensitivity(name, kinds[name], alone[0], alone[1], kept[0],
                                         kept[1]))
        logger.info('Sensitivity: %d layers measured', len(self.used))
        return sorted(rows, key=lambda r: (r.alone_sqnr, r.alone_miou))


def search_order(probe: SensitivityProbe, ranking: List[LayerSensitivity]) -> List[str]:
    """Layers in the order a skip list takes them: the largest simulated mIoU gain when kept
    FP32 first, then the lowest SQNR when quantized alone."""
    return [r.name for r in sorted(ranking, key=lambda r: (-(r.kept_miou - probe.fp32_miou),
                                                             r.alone_sqnr))]


def smallest_skip_set(probe: SensitivityProbe, ranking: List[LayerSensitivity],
                      max_drop: float, verify: Callable[[List[str]], float]
                      ) -> Tuple[List[str], List[Dict[str, Any]]]:
    """The shortest prefix of the layers ordered most sensitive first (the largest simulated
    mIoU gain when kept FP32, then the lowest SQNR alone) whose quantized model loses at most
    `max_drop` mIoU on the engine (`verify(skip)` -> its drop). The engine decides, the
    simulation only orders: a binary search over the prefix length (assuming a longer skip
    list never loses more) needs about log2(layers) engine checks. Returns (skip list,
    checks made, each with the simulated mIoU/SQNR of that set)."""
    order = search_order(probe, ranking)
    everything = set(probe.used)
    steps: Dict[int, Dict[str, Any]] = {}

    def meets(k: int) -> bool:
        miou, sqnr = probe.measure(everything - set(order[:k]))
        steps[k] = {'skip': k, 'simulated_miou': miou, 'sqnr': sqnr,
                    'engine_drop': verify(order[:k])}
        return steps[k]['engine_drop'] <= max_drop
    hi = max(len(order) - 1, 0)  # at least one layer stays quantized
    if meets(0):
        best = 0
    elif hi == 0 or not meets(hi):
        best = hi
    else:
        lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if meets(mid):
                hi = mid
            else:
                lo = mid
        best = hi
    return order[:best], [steps[k] for k in sorted(steps)]


class PTQEngineCheck:
    """verify(skip) for smallest_skip_set: quantizes the FP32 export with PTQ, the layers in
    `skip` kept FP32, and returns its mIoU drop against the FP32 model on the same engine
    (`backend`, CPU: Paddle Inference's oneDNN, OpenVINO, or onnxruntime on the --to_onnx
    file) on the first `num_images` val images. Every quantized layer runs INT8
    (--int8_layers all), the most INT8 any engine run of the model holds: the kinds
    --int8_layers auto leaves in float (timed at deployment, for its input size and CPU)
    only take roundings away."""

    def __init__(self, fp32_model: paddle.nn.Layer, cfg: Yaml, work_dir: str,
                 calib_paths: Sequence[str], qcfg: Yaml, dataset: SegDataset,
                 num_images: int, algo: str = 'abs_max', device: str = 'cpu',
                 backend: str = 'paddle', input_shape: Optional[Sequence[int]] = None):
        from segslim.export import export_inference_model
        self.model, self.qcfg, self.dataset = fp32_model, qcfg, dataset
        self.paths, self.algo, self.device, self.n = list(calib_paths), algo, device, num_images
        self.backend = backend
        self.fp32_dir = os.path.join(work_dir, 'fp32')
        self.int8_dir = os.path.join(work_dir, 'int8')
        export_inference_model(fp32_model, cfg, self.fp32_dir, input_shape=input_shape)
        self.base = self._miou(self.fp32_dir, 'fp32')

    def _miou(self, model_dir: str, precision: str) -> float:
        from segslim.deploy.benchmark import evaluate_engines
        from segslim.deploy.engines import create_predictor
        from segslim.options import EngineOptions
        if self.backend == 'onnxruntime':
            from segslim.onnx.export import CALIBRATION_IMAGES, export_onnx
            export_onnx(model_dir, 'onnxruntime', self.paths[:CALIBRATION_IMAGES])
        engine = create_predictor(model_dir, EngineOptions(backend=self.backend,
                                                           precision=precision,
                                                           int8_layers='all'))
        return evaluate_engines([engine], self.dataset, self.n,
                                desc=f'{precision.upper()} engine')[0].miou

    def __call__(self, skip: List[str]) -> float:
        from segslim.quant import ptq
        q = dict(self.qcfg, skip=list(self.qcfg['skip']) + list(skip))
        ptq.post_training_quantize(self.fp32_dir, self.int8_dir, self.paths, q,
                                   ptq.skipped_weights(self.model, q, '', False),
                                   self.algo, device=self.device)
        miou = self._miou(self.int8_dir, 'int8')
        logger.info('Engine check (%s), %d layers kept FP32: INT8 mIoU %.4f vs FP32 %.4f',
                    self.backend, len(skip), miou, self.base)
        return self.base - miou


def analyse(cfg: Yaml, weights: str, config: str, save_dir: str, num_images: int,
            calib_images: int, max_miou_drop: Optional[float], algo: str = 'abs_max',
            device: str = 'cpu', backend: str = 'paddle',
            input_shape: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """The sensitivity of every layer of the config's model with `weights`, and a skip list:
    with `max_miou_drop` the shortest one whose PTQ model meets it on the engine (`backend`,
    on CPU), else the
    layers whose quantization alone costs DEFAULT_SKIP_DROP in simulation; the engine check's
    exports take `input_shape` (None: dynamic). Writes the files of write_sensitivity and
    returns their paths."""
    import tempfile

    from segslim import builder
    from segslim.builder import build_dataset
    from segslim.modeldir import Preprocessor, deploy_transforms
    from segslim.quant import ptq
    from segslim.quant.qat import quant_config_of
    from segslim.train.checkpoint import load_weights
    qcfg = quant_config_of(cfg)

    def build() -> paddle.nn.Layer:
        model = builder.build_model(cfg)
        load_weights(model, weights)
        return model
    train_ds = build_dataset(cfg, 'train_dataset')
    val_ds = build_dataset(cfg, 'val_dataset')
    paths = ptq.calibration_paths(train_ds.file_list, min(calib_images, len(train_ds)))
    ptq.warn_if_too_few(len(paths), calib_images, len(train_ds))
    pre = Preprocessor(deploy_transforms(cfg))
    probe = SensitivityProbe(build, qcfg, [pre(p)[0][np.newaxis] for p in paths], val_ds,
                             num_images)
    n = len(probe.samples)
    logger.info('Sensitivity of %d layers on %d val images (FP32 mIoU %.4f)', len(probe.used),
                n, probe.fp32_miou)
    ranking = probe.rank()
    steps = None
    if max_miou_drop is None:
        skip = [r.name for r in ranking if probe.fp32_miou - r.alone_miou >= DEFAULT_SKIP_DROP]
        note = ('Skip list: the layers whose quantization alone costs at least '
                f'{100 * DEFAULT_SKIP_DROP:.1f} mIoU '
                'points in simulation; not checked on the engine (--max_miou_drop gives a '
                'checked set).')
    else:
        with tempfile.TemporaryDirectory(prefix='segslim-analysis-') as tmp:
            check = PTQEngineCheck(build(), cfg, tmp, paths, qcfg, val_ds, n, algo, device,
                                   backend, input_shape)
            skip, steps = smallest_skip_set(probe, ranking, max_miou_drop, check)
        met = any(s['skip'] == len(skip) and s['engine_drop'] <= max_miou_drop for s in steps)
        note = ('Skip list: the shortest prefix of the ranking whose PTQ ({}) model stays '
                'within {:.4f} mIoU of FP32 on the {} engine ({} val images): '
                '{}.'.format(algo, max_miou_drop, backend_label(backend), n,
                             f'met, {len(skip)} layers kept FP32' if met else
                             'NOT met by any set tried'))
        (logger.info if met else logger.warning)(note)
    return write_sensitivity(save_dir, probe, ranking, skip, config, qcfg['skip'], note, steps)


def write_sensitivity(save_dir: str, probe: SensitivityProbe, ranking: List[LayerSensitivity],
                      skip: List[str], config: str, existing_skip: Sequence[str],
                      note: str, steps: Optional[List[Dict[str, Any]]] = None) -> Dict[str, str]:
    """sensitivity.md, sensitivity.png, sensitivity.json and skip_layers.yml (a config:
    `_base_` the analysed one, quant_config.skip the skip list) in save_dir; returns their
    paths."""
    os.makedirs(save_dir, exist_ok=True)
    paths = {k: os.path.join(save_dir, v) for k, v in (
        ('md', 'sensitivity.md'), ('png', 'sensitivity.png'), ('json', 'sensitivity.json'),
        ('yml', 'skip_layers.yml'))}
    unused = [n for n in probe.wrappers if n not in probe.used]
    lines = ['# Quantization sensitivity', '',
             f'FP32 mIoU {probe.fp32_miou:.4f} on {len(probe.samples)} val images; every layer '
             'quantized: see the steps below. '
             '"alone": only that layer quantized; "kept FP32": every other layer quantized. '
             'SQNR of the logits against FP32, in dB (higher is closer). Most sensitive first.', '',
             '| # | layer | type | alone mIoU | alone SQNR dB | kept FP32 mIoU | kept FP32 SQNR '
             'dB | skipped |', '|---|---|---|---|---|---|---|---|']
    for i, r in enumerate(ranking, 1):
        lines.append('| {} | {} | {} | {:.4f} | {:.1f} | {:.4f} | {:.1f} | {} |'.format(
            i, r.name, r.kind, r.alone_miou, r.alone_sqnr, r.kept_miou, r.kept_sqnr,
            'yes' if r.name in skip else ''))
    if unused:
        lines += ['', 'Not run at inference (training-only heads), not ranked: {}'.format(
            ', '.join(unused))]
    if steps:
        lines += ['', '## Skip set search', '', '| layers kept FP32 | simulated mIoU | SQNR dB '
                  '| engine mIoU drop |', '|---|---|---|---|']
        for s in steps:
            lines.append('| {} | {:.4f} | {:.1f} | {} |'.format(
                s['skip'], s['simulated_miou'], s['sqnr'],
                '{:.4f}'.format(s['engine_drop']) if 'engine_drop' in s else '-'))
    lines += ['', note, '', '![sensitivity](sensitivity.png)']
    write_text(paths['md'], '\n'.join(lines) + '\n')
    write_json(paths['json'], {
        'fp32_miou': probe.fp32_miou, 'num_images': len(probe.samples),
        'ranking': [asdict(r) for r in ranking], 'search_order': search_order(probe, ranking),
        'skip': list(skip), 'steps': steps or [], 'not_run_at_inference': unused})
    _chart(ranking, probe.fp32_miou, paths['png'])
    base = os.path.relpath(os.path.abspath(config), os.path.abspath(save_dir))
    body = yaml.safe_dump({'_base_': base, 'quant_config': {
        'skip': list(existing_skip) + [n for n in skip if n not in existing_skip]}},
        sort_keys=False)
    write_text(paths['yml'], f'# {note}\n# Use it as the config of qat_train.py, qat_export.py or '
               f'ptq.py.\n{body}')
    return paths


def _chart(ranking: List[LayerSensitivity], fp32_miou: float, path: str) -> None:
    from segslim.deploy.report import pyplot, save_figure
    plt = pyplot()
    rows = ranking[:CHART_LAYERS]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.28 * len(rows)), sharey=True)
    y = np.arange(len(rows))[::-1]
    finite = [r.alone_sqnr if math.isfinite(r.alone_sqnr) else 99.0 for r in rows]
    ax1.barh(y, finite, color='#4f81bd', height=0.7)
    ax1.set_yticks(y)
    ax1.set_yticklabels([r.name for r in rows], fontsize=7)
    ax1.set_xlabel('logit SQNR, only this layer quantized (dB)')
    ax1.set_xlim(0, max(finite) * 1.1)
    ax2.barh(y, [100 * (fp32_miou - r.alone_miou) for r in rows], color='#c0504d', height=0.7)
    ax2.axvline(0, color='black', linewidth=0.8)
    ax2.set_xlabel('mIoU loss, only this layer quantized (points)')
    fig.suptitle(f'Most sensitive {len(rows)} of {len(ranking)} layers', fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
