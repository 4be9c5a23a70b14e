"""The engine interface every backend implements, and what all of them share: the model
folder's deploy.yaml, the deploy transforms, restoring label maps to the image size and
the op summary that says what ran INT8."""
import os
from typing import Any, Dict, Hashable, List, Optional, Sequence, TypeVar

import numpy as np

import segslim
from segslim.compat import package_versions
from segslim.deploy.cpu import cpu_features
from segslim.deploy.int8_kinds import ChoiceCache, KindChoice, choose_float_kinds
from segslim.deploy.results import (
    NO_INT8_NOTE,
    NOT_FASTER_NOTE,
    OpSummary,
    PassChange,
    Precision,
)
from segslim.errors import UserError
from segslim.logger import logger
from segslim.modeldir import IR_QUANT_OP, ONNX_QUANT_OPS, model_format, read_deploy
from segslim.options import EngineOptions
from segslim.program import QUANT_OP_TYPES, program_op_types

# Without VNNI, x86 INT8 kernels add each pair of u8 x s8 products in a 16-bit lane
# (vpmaddubsw): 8-bit weights can saturate it (2 x 255 x 127 > 32767), 7-bit ones cannot.
SEVEN_BIT_LIMIT = 64
SEVEN_BIT_NOTE = ('weights requantized to 7 bits: without VNNI the INT8 kernels add pairs of '
                  'u8 x s8 products in 16 bits, where 8-bit weights saturate')


def seven_bit(q: np.ndarray) -> Optional[np.ndarray]:
    """Symmetric INT8 weights `q` requantized to 7 bits (round(q / 2); their scale doubles),
    or None when they already fit."""
    if np.abs(q.astype(np.int16)).max() <= SEVEN_BIT_LIMIT:
        return None
    return np.clip(np.round(q.astype(np.float32) / 2), -SEVEN_BIT_LIMIT,
                   SEVEN_BIT_LIMIT).astype(np.int8)


Key = TypeVar('Key', bound=Hashable)


def median_per_key(runs: Sequence[Dict[Key, float]]) -> Dict[Key, float]:
    """Each key's median over `runs` (one {key: ms} per run; a key a run lacks is 0 there),
    keys whose median is 0 left out: an engine's per-node times on a shared machine, where
    one slow run moves a mean by more than the differences a profile is read for."""
    keys = {key for run in runs for key in run}
    medians = {key: float(np.median([run.get(key, 0.0) for run in runs])) for key in keys}
    return {key: ms for key, ms in medians.items() if ms > 0}


def onnx_op_types(model_file: str) -> List[str]:
    """The node types of an ONNX model's main graph."""
    import onnx
    try:
        return [node.op_type for node in onnx.load(model_file, load_external_data=False).graph.node]
    except Exception as e:  # onnx raises DecodeError and others on a damaged file
        raise UserError(f'{model_file} is not a valid ONNX file ({type(e).__name__}); '
                        're-export the model') from e


def ir_op_types(model_file: str) -> List[str]:
    """The layer types of an OpenVINO IR model.xml."""
    import xml.etree.ElementTree as ET
    try:
        return [layer.get('type', '') for layer in ET.parse(model_file).getroot().iter('layer')]
    except ET.ParseError as e:
        raise UserError(f'{model_file} is not a valid OpenVINO IR file ({e}); re-export the '
                        'model') from e


def output_labels(out: np.ndarray) -> np.ndarray:
    """Class ids N,H,W of a model output, whatever the exported head: argmax N,H,W
    (PaddleSeg's contract) or N,1,H,W (older exports), softmax or logits N,C,H,W. Read from
    the output itself: upstream exports do not always name their head."""
    if np.issubdtype(out.dtype, np.floating) and out.ndim == 4 and out.shape[1] > 1:
        return out.argmax(axis=1).astype(np.int64)
    return out.reshape(out.shape[0], out.shape[-2], out.shape[-1]).astype(np.int64)


def restore_size(labels: np.ndarray, trans_info: list) -> np.ndarray:
    """Undoes the transforms' resize/padding records on a H,W label map with paddleseg's
    reverse_transform (nearest for labels): the one restore rule for engine outputs and,
    in pixel agreement, for the dygraph model's."""
    if not trans_info:
        return labels
    from paddleseg.core.infer import reverse_transform

    from segslim._paddle import paddle
    out = reverse_transform(paddle.to_tensor(labels[np.newaxis, np.newaxis].astype(np.int32)),
                            trans_info, mode='nearest')
    return out.numpy()[0, 0].astype(labels.dtype)


class EngineBase:
    """What every backend's predictor offers: `deploy` (read_deploy), `model_dir`, `opts`,
    `quantized`, `precision` (what the engine runs) with `precision_note` (NO_INT8_NOTE for
    a quantized model it runs in FP32), `fallback` (what was changed to make it run, or
    None), `fp32_convs`, `ops` (what runs INT8) and run() on a N,C,H,W batch."""
    backend = ''
    package = ''  # the installed package that is the engine (its version goes in the report)
    precision: Precision
    precision_note: Optional[str] = None

    @property
    def engine_version(self) -> str:
        """'openvino 2026.4.1': the engine package and its installed version."""
        return '{} {}'.format(self.package,
                              package_versions([self.package]).get(self.package, '?'))

    def __init__(self, model_dir: str, opts: EngineOptions):
        self.deploy = read_deploy(model_dir)
        self.opts = opts
        self.model_dir = model_dir
        self.format = model_format(self.deploy)
        # a peer quantizer's model (segslim.bench.peers) runs as its maker wrote it
        self.peer: Optional[str] = (self.deploy.get('peer') or {}).get('quantizer')
        if self.format == 'openvino':
            self.op_types = ir_op_types(self.deploy['model'])
            self.quantized = IR_QUANT_OP in self.op_types
        elif self.format == 'onnx':
            self.op_types = onnx_op_types(self.deploy['model'])
            self.quantized = any(t in ONNX_QUANT_OPS for t in self.op_types)
        else:
            self.op_types = program_op_types(self.deploy['model'])
            self.quantized = any(t in QUANT_OP_TYPES for t in self.op_types)
        self.fallback: Optional[str] = None
        # an INT8 model's unquantized ops in a lower float precision ('bf16'), None: FP32
        self.rest: Optional[str] = None
        # the kinds of quantized layer --int8_layers auto leaves in float (int8_kinds)
        self.kinds = KindChoice()
        # convs the model quantizes that the engine runs in FP32 (no fast INT8 kernel for them
        # on this CPU); `fallback` says why
        self.fp32_convs: List[str] = []
        # what the engine changed in the exported program before running it, by change: a
        # kind choice is kept for the program as run (_choice_cache)
        self.program_changes: Dict[str, Any] = {}
        self.ops = OpSummary()
        if opts.precision == 'int8' and not self.quantized:
            raise UserError(f'{model_dir} holds no quantization scales, so INT8 would silently '
                            'run FP32; '
                            'export it with slim/quant/qat_export.py or ptq.py')

    def run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fixed_shape(self) -> bool:
        """Whether the model was exported with one fixed input shape."""
        shape = self.deploy.get('input_shape') or []
        return len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape)

    def probe_shape(self) -> List[int]:
        """The exported fixed input shape, else opts.input_shape: what a first run uses."""
        if self.fixed_shape():
            return [int(v or 0) for v in self.deploy['input_shape']]
        return list(self.opts.input_shape)

    @property
    def passes(self) -> Optional[PassChange]:
        """What the engine changes in its optimization pass list (None: nothing to say)."""
        return None

    @property
    def int8_ran(self) -> bool:
        """Whether the engine runs any quantizable op of this model in INT8."""
        return self.precision is Precision.INT8 and self.ops.int8_ops > 0

    def ran_no_int8(self) -> None:
        """Marks a quantized model whose engine ran none of it in INT8: it has no INT8
        kernels for it, or INT8 was not faster for any kind of its layers (int8_kinds)."""
        self.precision = Precision.FP32
        self.precision_note = NOT_FASTER_NOTE if self.kinds.float_kinds else NO_INT8_NOTE

    def add_fallback(self, note: str) -> None:
        """Adds `note` to what was changed to make or keep the engine fast."""
        self.fallback = f'{self.fallback}; {note}' if self.fallback else note

    def choose_kinds(self, present: Any, build: Any) -> KindChoice:
        """--int8_layers auto for a quantized model with layers of the kinds `present`:
        `build(kinds, images)` returns a callable that runs the engine's model once with
        those kinds in float on `images` (random, at the probe shape). Sets and returns
        `kinds` (nothing in float when the opts say all, for a peer's model, or when a
        variant fails to build) and names the float kinds in `fallback`."""
        if not present or self.opts.int8_layers != 'auto' or self.peer is not None:
            return self.kinds
        kinds = sorted(present)
        cache = self._choice_cache(kinds)
        cached = cache.load()
        if cached is not None:
            self.kinds = cached
        else:
            images = np.random.default_rng(0).standard_normal(
                self.probe_shape()).astype(np.float32)
            try:
                self.kinds = choose_float_kinds(kinds, lambda chosen: build(chosen, images))
                cache.save(self.kinds)
            except Exception as e:  # the engines raise their own generic errors
                logger.warning('%s: could not time INT8 per kind of layer (%s); every '
                               'quantized layer runs INT8', self.model_dir, str(e).strip()[:160])
        if self.kinds.float_kinds:
            self.add_fallback(self.kinds.describe())
        return self.kinds

    def _choice_cache(self, present: List[str]) -> ChoiceCache:
        """Where the kind choice of this model as the engine runs it (program_changes), with
        this engine, precision, thread count, input shape and CPU, is kept
        (int8_kinds.ChoiceCache)."""
        cpu = cpu_features(ask_paddle=False)
        files = [p for p in (self.deploy['model'], self.deploy.get('params'))
                 if p and os.path.isfile(p)]
        return ChoiceCache(files, {
            'backend': self.backend, 'precision': self.opts.precision,
            'threads': self.opts.cpu_threads, 'shape': self.probe_shape(), 'kinds': present,
            'program_changes': self.program_changes,
            'cpu': [cpu['model'], cpu['isa']], 'segslim': segslim.__version__,
            'versions': package_versions([self.package])})

    def to_labels(self, out: np.ndarray) -> np.ndarray:
        return output_labels(out)

    def labels(self, images: np.ndarray) -> np.ndarray:
        """Class ids N,H,W of a N,C,H,W float32 batch."""
        return self.to_labels(self.run(images))
