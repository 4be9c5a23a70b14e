"""The backend registry: which engines exist, what each is called in a report, whether it
has a bf16 CPU path, and the factory that builds a predictor for a model folder. Importing
this module imports no engine."""
import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from segslim.errors import UserError
from segslim.options import EngineOptions


@dataclass(frozen=True)
class Backend:
    name: str           # --backend value
    label: str          # how reports name it
    module: str         # where its predictor lives
    predictor: str      # the predictor class
    bf16: bool          # has a bf16 CPU path worth a baseline row
    formats: Tuple[str, ...] = ('paddle',)  # model folders it runs (modeldir.model_format)
    requires: Tuple[str, ...] = ()          # optional packages it needs
    bf16_rest: bool = False  # runs an INT8 model's unquantized ops in bf16 (--precision bf16)


BACKENDS: Dict[str, Backend] = {b.name: b for b in (
    Backend('paddle', 'Paddle Inference', 'segslim.deploy.paddle_engine', 'PaddlePredictor',
            True),
    Backend('openvino', 'OpenVINO', 'segslim.deploy.openvino_engine', 'OpenVINOPredictor',
            True, ('paddle', 'openvino'), ('openvino',), bf16_rest=True),
    Backend('onnxruntime', 'onnxruntime', 'segslim.deploy.onnxruntime_engine',
            'OnnxRuntimePredictor', False, ('paddle', 'onnx'),
            ('onnxruntime', 'onnx', 'paddle2onnx')),
)}
BACKEND_NAMES: Tuple[str, ...] = tuple(BACKENDS)
FORMAT_NAMES = {'paddle': 'a Paddle inference program', 'onnx': 'an ONNX model (model.onnx)',
                'openvino': 'an OpenVINO IR model (model.xml)'}


def importable(*modules: str) -> bool:
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def available_backends() -> List[str]:
    """The engines whose packages import (Paddle Inference always)."""
    return [b.name for b in BACKENDS.values() if importable(*b.requires)]


def backend_label(name: str) -> str:
    return BACKENDS[name].label if name in BACKENDS else name


def model_format_of(model_dir: str) -> str:
    return format_and_engine(model_dir)[0]


def format_and_engine(model_dir: str) -> Tuple[str, Optional[str]]:
    """The model folder's format (modeldir.model_format) and the one engine a peer
    quantizer's folder is made for (deploy.yaml `peer`; None for ours)."""
    from segslim.modeldir import model_format, read_deploy
    deploy = read_deploy(model_dir)
    return model_format(deploy), (deploy.get('peer') or {}).get('engine')


def runs_model(backend: str, model_dir: str) -> bool:
    """Whether the backend runs the model folder's format (an OpenVINO IR folder runs on
    OpenVINO only, an ONNX-only folder on onnxruntime only) and, for a peer quantizer's
    model, whether it is the engine the model was made for."""
    fmt, engine = format_and_engine(model_dir)
    return fmt in BACKENDS[backend].formats and engine in (None, backend)


def create_predictor(model_dir: str, opts: EngineOptions):
    """The predictor of opts.backend for an exported model folder (an EngineBase)."""
    backend = BACKENDS.get(opts.backend)
    if backend is None:
        raise UserError('--backend {} is unknown; use one of {}'.format(
            opts.backend, ', '.join(BACKEND_NAMES)))
    fmt = model_format_of(model_dir)
    if fmt not in backend.formats:
        raise UserError('{} holds {}, which --backend {} cannot run; use --backend {}'.format(
                            model_dir, FORMAT_NAMES[fmt], opts.backend, ' or '.join(
                            b.name for b in BACKENDS.values() if fmt in b.formats)))
    cls = getattr(importlib.import_module(backend.module), backend.predictor)
    return cls(model_dir, opts)
