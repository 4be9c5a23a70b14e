"""The engines' makers' own post-training quantizers, each called as its documentation shows
it, on the same FP32 export and the same calibration images as our INT8 models, so that a
benchmark times them beside ours in one run:

- NNCF (OpenVINO): `nncf.quantize(model, nncf.Dataset(images))`, every setting its default
  but `model_type=nncf.ModelType.TRANSFORMER` for a transformer, as its documentation asks
  (quant.nncf.nncf_model_type), saved with `openvino.save_model`;
- onnxruntime: `quant_pre_process`, then `quantize_static` in QDQ format with per-channel
  weights, u8 activations and s8 weights (the x86 choice of its documentation);
- PaddleSlim (Paddle Inference): `quant_post_static` with its defaults (hist activations,
  channel-wise weights, ONNX-style quantize_linear ops).

Each writes a model folder whose deploy.yaml names the peer and the one engine it is made for
(`peer: {quantizer, engine}`); the engines run such a model as written (no 7-bit weights, no
FakeQuantize removed) and a benchmark times it on that engine only."""
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from segslim.config import Yaml
from segslim.deploy.bench_report import PEER_LABELS
from segslim.deploy.engines import BACKENDS, importable
from segslim.errors import UserError
from segslim.logger import logger, quiet_native_output
from segslim.modeldir import (
    Deploy,
    quantized_deploy,
    read_deploy,
    staged_model_folder,
    write_deploy,
)


@dataclass(frozen=True)
class Peer:
    name: str       # the key in benchmark.json (<name>_s)
    engine: str     # the one backend its model is made for
    requires: Sequence[str]
    make: Callable[[Deploy, str, Sequence[np.ndarray]], Deploy]

    @property
    def label(self) -> str:
        return PEER_LABELS[self.name]


def _deploy_of(deploy: Deploy, peer: 'Peer', model: str, params: str, images: int,
               **settings: str) -> Deploy:
    return quantized_deploy(deploy, model, params,
                            peer={'quantizer': peer.name, 'engine': peer.engine},
                            calibration={'method': peer.name, 'images': images, **settings})


def _nncf(deploy: Deploy, stage: str, batches: Sequence[np.ndarray]) -> Deploy:
    import nncf
    import openvino as ov

    from segslim.quant.nncf import nncf_model_type
    model = ov.Core().read_model(deploy['model'], deploy['params'])
    model_type = nncf_model_type(nncf, model)
    quantized = nncf.quantize(model, nncf.Dataset(list(batches)), model_type=model_type)
    ov.save_model(quantized, os.path.join(stage, 'model.xml'))
    return _deploy_of(deploy, PEERS['nncf_openvino'], 'model.xml', 'model.bin', len(batches),
                      **({'model_type': model_type.value} if model_type else {}))


def _onnxruntime(deploy: Deploy, stage: str,
                 batches: Sequence[np.ndarray]) -> Deploy:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )
    with tempfile.TemporaryDirectory(prefix='segslim-peer-') as tmp:
        fp32 = os.path.join(deploy['dir'], deploy['onnx']) if deploy.get('onnx') else \
            _fp32_onnx(deploy, tmp)
        pre = os.path.join(tmp, 'pre.onnx')
        fp32, cwd = os.path.abspath(fp32), os.getcwd()
        os.chdir(tmp)  # a failed symbolic shape inference leaves its model in the cwd
        try:
            with quiet_native_output():
                try:
                    quant_pre_process(fp32, pre)
                except Exception:  # its documented way out when symbolic shapes fail
                    quant_pre_process(fp32, pre, skip_symbolic_shape=True)
        finally:
            os.chdir(cwd)
        name = onnx.load(pre, load_external_data=False).graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{name: b} for b in batches])

            def get_next(self) -> Any:
                return next(self.items, None)
        reader = Reader()
        with quiet_native_output():
            quantize_static(pre, os.path.join(stage, 'model.onnx'), reader,
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return _deploy_of(deploy, PEERS['onnxruntime_quantize_static'], 'model.onnx', 'model.onnx',
                      len(batches))


def _fp32_onnx(deploy: Deploy, tmp: str) -> str:
    """The FP32 export as ONNX, converted in a copy (the user's folder stays as it is)."""
    from segslim.onnx.export import export_onnx
    copy = os.path.join(tmp, 'fp32')
    shutil.copytree(deploy['dir'], copy)
    return export_onnx(copy)


def _paddleslim(deploy: Deploy, stage: str,
                batches: Sequence[np.ndarray]) -> Deploy:
    from paddleslim.quant import quant_post_static

    from segslim._paddle import paddle
    from segslim.program import program_input_names
    feed = (program_input_names(deploy['model']) or ['x'])[0]

    class Images(paddle.io.Dataset):
        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, i: int) -> np.ndarray:
            return batches[i][0]

    paddle.enable_static()
    try:
        loader = paddle.io.DataLoader(Images(), batch_size=1, shuffle=False,
                                      collate_fn=lambda b: {feed: np.stack(b)})
        with quiet_native_output():
            quant_post_static(executor=paddle.static.Executor(paddle.CPUPlace()),
                              model_dir=deploy['dir'], quantize_model_path=stage,
                              data_loader=loader,
                              model_filename=os.path.basename(deploy['model']),
                              params_filename=os.path.basename(deploy['params']))
    finally:
        paddle.disable_static()
    return _deploy_of(deploy, PEERS['paddleslim_ptq_paddle'], 'model.pdmodel',
                      'model.pdiparams', len(batches))


PEERS: Dict[str, Peer] = {p.name: p for p in (
    Peer('nncf_openvino', 'openvino', ('nncf', 'openvino'), _nncf),
    Peer('onnxruntime_quantize_static', 'onnxruntime', ('onnxruntime', 'onnx', 'paddle2onnx'),
         _onnxruntime),
    Peer('paddleslim_ptq_paddle', 'paddle', ('paddleslim',), _paddleslim),
)}


def make_peer(name: str, fp32_dir: str, save_dir: str,
              batches: Sequence[np.ndarray]) -> str:
    """Quantizes the FP32 export in `fp32_dir` with peer `name` on `batches` (1,C,H,W images
    through the deploy transforms) into the model folder `save_dir`; returns it."""
    peer = PEERS[name]
    deploy = read_deploy(fp32_dir)
    if deploy.get('quantized'):
        raise UserError(f'{fp32_dir} is already quantized; the peers quantize an FP32 export')
    if not batches:
        raise UserError('the peer quantizers need calibration images; none were given')
    with staged_model_folder(save_dir) as stage:
        write_deploy(stage, peer.make(deploy, stage, batches))
    logger.info('%s (%d calibration images) wrote %s', peer.label, len(batches), save_dir)
    return save_dir


def make_peers(fp32_dir: str, work_dir: str, batches: Sequence[np.ndarray],
               backends: Sequence[str]) -> List[str]:
    """The model folder of every peer whose engine is among `backends` and whose packages are
    installed, under `work_dir`/<peer name>; a peer that fails is logged and left out (the
    benchmark times the others)."""
    dirs = []
    for peer in PEERS.values():
        if peer.engine not in backends:
            continue
        missing = [m for m in (*peer.requires, *BACKENDS[peer.engine].requires)
                   if not importable(m)]
        if missing:
            logger.warning('peer %s needs %s: pip install -e .[openvino,onnx]; left out',
                           peer.label, ', '.join(missing))
            continue
        try:
            dirs.append(make_peer(peer.name, fp32_dir, os.path.join(work_dir, peer.name),
                                  batches))
        except UserError:
            raise
        except Exception as e:  # a peer's own failure on this model: the run goes on
            logger.warning('peer %s could not quantize %s (%s: %s); left out', peer.label,
                           fp32_dir, type(e).__name__, str(e).strip().splitlines()[-1][:160]
                           if str(e).strip() else '')
    return dirs



def peers_of(fp32_dir: str, cfg: Yaml, work_dir: str, backends: Sequence[str],
             count: int) -> List[str]:
    """make_peers on the `count` train images of the config that our PTQ calibrates on
    (ptq.calibration_paths), as the FP32 export's deploy transforms give them."""
    from segslim.builder import build_dataset
    from segslim.modeldir import model_inputs
    from segslim.quant.ptq import calibration_paths
    files = build_dataset(cfg, 'train_dataset').file_list
    batches = model_inputs(read_deploy(fp32_dir), calibration_paths(files, count))
    return make_peers(fp32_dir, work_dir, batches, backends)
