"""The model folder every command writes and every engine reads: deploy.yaml (PaddleSeg's
`Deploy:` section), its model files, staged writes that replace a model whole, and the deploy
transforms that turn an image into the model's input. The program files themselves are read and
rewritten in segslim.program."""
import contextlib
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union, cast

import numpy as np
import numpy.typing as npt
import yaml

from segslim import builder
from segslim.compat import MODEL_STACK, package_versions
from segslim.config import Yaml
from segslim.data.datasets import read_image
from segslim.errors import UserError
from segslim.fileio import move_into_place, write_text

# OpenVINO IR (model.xml/model.bin, written by ptq.py --quantizer nncf): only OpenVINO runs it.
IR_SUFFIX = '.xml'
IR_QUANT_OP = 'FakeQuantize'
# A folder whose model is an ONNX file (its weights inside, no Paddle program beside it): the
# peers' onnxruntime quantize_static output. Only onnxruntime runs it.
ONNX_SUFFIX = '.onnx'
ONNX_QUANT_OPS = ('QuantizeLinear', 'QLinearConv', 'DequantizeLinear')
STAGE_PREFIX = '.export-'
Array = npt.NDArray[Any]  # an image, or a batch the model takes
MODEL_FILES = ('model.pdmodel', 'model.pdiparams', 'model.pdiparams.info', 'model.xml',
               'model.bin', 'model.onnx', 'deploy.yaml')


class Deploy(TypedDict, total=False):
    """deploy.yaml's `Deploy` section: PaddleSeg's keys (model, params, transforms,
    input_shape, output_op, output_dtype), then the ones the quantized folders add. read_deploy
    makes model/params absolute and adds `dir`, the folder; write_deploy never writes `dir`."""
    model: str
    params: str
    transforms: List[Yaml]
    input_shape: List[Optional[int]]
    output_op: str  # argmax | softmax | none
    output_dtype: str
    quantized: bool
    int8_ops: List[str]  # op types the oneDNN engine runs in INT8 (QAT and PTQ exports)
    onnx: str  # model.onnx beside the program (--to_onnx), or the model itself
    onnx_target: str  # the engine its Q/DQ placement is made for
    engine: str  # the engine auto-quant chose the folder for
    peer: Dict[str, str]  # an engine maker's quantizer: its name and the one engine it runs on
    calibration: Dict[str, Union[str, int, float]]  # method, images and the method's settings
    versions: Dict[str, str]  # python and the packages (compat.MODEL_STACK) that wrote it
    dir: str


def read_deploy(model_dir: str) -> Deploy:
    """The `Deploy` section of <model_dir>/deploy.yaml with absolute model/params paths."""
    path = os.path.join(model_dir, 'deploy.yaml') if os.path.isdir(model_dir) else model_dir
    if not os.path.isfile(path):
        raise UserError(f'{model_dir} has no deploy.yaml; pass a folder written by export.py or '
                        'qat_export.py')
    try:
        with open(path) as f:
            deploy = (yaml.safe_load(f) or {}).get('Deploy')
    except (yaml.YAMLError, AttributeError) as e:
        raise UserError(f'{path} is not a valid deploy.yaml ({type(e).__name__}); re-export the '
                        'model') from e
    if isinstance(deploy, dict) and str(deploy.get('model', '')).endswith(ONNX_SUFFIX):
        deploy = dict(deploy, params=deploy['model'], onnx=deploy['model'])  # weights inside
    if not isinstance(deploy, dict) or 'model' not in deploy or 'params' not in deploy:
        raise UserError(f'{path} lacks Deploy.model/Deploy.params; re-export the model')
    base = os.path.dirname(os.path.abspath(path))
    deploy = dict(deploy)
    for key in ('model', 'params'):
        deploy[key] = os.path.join(base, deploy[key])
        if not os.path.isfile(deploy[key]):
            raise UserError(f'{path} names {deploy[key]} which does not exist; re-export the model')
    deploy.setdefault('transforms', [{'type': 'Normalize'}])
    deploy.setdefault('output_op', 'argmax')
    deploy['dir'] = base
    return cast(Deploy, deploy)


def model_format(deploy: Deploy) -> str:
    """'openvino' for an OpenVINO IR model folder, 'onnx' for a folder holding an ONNX model
    alone, else 'paddle' (a Paddle inference program, with its model.onnx beside it when
    exported --to_onnx)."""
    if deploy['model'].endswith(IR_SUFFIX):
        return 'openvino'
    return 'onnx' if deploy['model'].endswith(ONNX_SUFFIX) else 'paddle'


@contextlib.contextmanager
def staged_model_folder(save_dir: str) -> Iterator[str]:
    """Yields a staging folder inside save_dir for model.pdmodel/.pdiparams/deploy.yaml;
    when the block succeeds each file is moved into save_dir whole (an existing model there is
    replaced, not mixed; other files stay). The stage is always removed, and a killed run's
    stages are cleared on the next one."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):
            if name.startswith(STAGE_PREFIX):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=save_dir)
    except OSError as e:
        raise UserError(f'cannot write --save_dir {save_dir} ({e.strerror}); choose a writable '
                        'folder') from e
    try:
        yield stage
        for name in MODEL_FILES:
            if os.path.exists(os.path.join(stage, name)):
                move_into_place(os.path.join(stage, name), os.path.join(save_dir, name))
    except OSError as e:
        raise UserError(f'cannot write the model to {save_dir} ({e.strerror or e}); check space '
                        'and permissions') from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_deploy(folder: str, section: Deploy) -> None:
    """<folder>/deploy.yaml holding `Deploy: section` (PaddleSeg's layout), written whole,
    with the versions of the stack writing it."""
    out = {k: v for k, v in section.items() if k not in ('dir', 'versions')}
    out['versions'] = package_versions(MODEL_STACK)
    text = yaml.safe_dump({'Deploy': out}, sort_keys=False, default_flow_style=None)
    write_text(os.path.join(folder, 'deploy.yaml'), text)


def update_deploy(model_dir: str, **keys: Any) -> None:
    """Sets `keys` in <model_dir>/deploy.yaml's Deploy section, the rest kept as written."""
    path = os.path.join(model_dir, 'deploy.yaml')
    with open(path) as f:
        section = yaml.safe_load(f)['Deploy']
    section.update(keys)
    write_deploy(model_dir, cast(Deploy, section))


def quantized_deploy(deploy: Deploy, model: str, params: str, **extra: Any) -> Deploy:
    """The deploy section of a quantized model made from the FP32 export's `deploy`
    (read_deploy's): its transforms, shape and head kept, its files and ONNX entries
    replaced by `model`, `params` and `extra` (Deploy's keys)."""
    out = {k: v for k, v in deploy.items()
           if k not in ('dir', 'model', 'params', 'onnx', 'onnx_target')}
    out.update(model=model, params=params, quantized=True, **extra)
    return cast(Deploy, out)


def deploy_transforms(cfg: Yaml) -> List[Yaml]:
    """The transforms an export writes to deploy.yaml: the config's `export.transforms`,
    else its val_dataset's, else Normalize alone."""
    export_cfg = cfg.get('export') or {}
    if export_cfg.get('transforms') is not None:
        return cast(List[Yaml], export_cfg['transforms'])
    return cast(List[Yaml], (cfg.get('val_dataset') or {}).get('transforms') or
                [{'type': 'Normalize'}])


class Preprocessor:
    """The deploy.yaml transforms applied to an image (a file, or a H,W,3 BGR array as
    cv2 reads it), as in deployment; returns (C,H,W float32, trans_info)."""

    def __init__(self, transforms: List[Yaml]):
        from paddleseg.transforms import Compose
        self.compose = Compose(builder.build_transforms(transforms, 'Deploy.transforms'))

    def __call__(self, image: Union[str, Array]) -> Tuple[Array, List[Any]]:
        img = read_image(image) if isinstance(image, str) else image.astype(np.float32)
        data = self.compose({'img': img, 'trans_info': [], 'gt_fields': []})
        return data['img'], data['trans_info']


def resize_chw(image: Array, height: int, width: int) -> Array:
    """A preprocessed C,H,W float image resized (bilinear) to C,height,width."""
    import cv2
    hwc = cv2.resize(np.transpose(image, (1, 2, 0)), (width, height),
                     interpolation=cv2.INTER_LINEAR).reshape(height, width, -1)
    return np.ascontiguousarray(np.transpose(hwc, (2, 0, 1)), dtype=np.float32)


def model_inputs(deploy: Deploy, images: Sequence[Union[str, Array]]) -> List[Array]:
    """The images as the deployed model sees them: 1,C,H,W batches after the deploy
    transforms, resized to the export's input size when it is fixed."""
    pre = Preprocessor(deploy.get('transforms') or [{'type': 'Normalize'}])
    shape = deploy.get('input_shape') or []
    size: Optional[Tuple[int, int]] = None
    if len(shape) == 4 and (shape[2] or 0) > 0 and (shape[3] or 0) > 0:
        size = (int(shape[2] or 0), int(shape[3] or 0))
    batches = []
    for image in images:
        chw = pre(image)[0]
        if size and chw.shape[1:] != size:
            chw = resize_chw(chw, *size)
        batches.append(np.ascontiguousarray(chw[np.newaxis], dtype=np.float32))
    return batches
