"""ptq.py --quantizer nncf: OpenVINO's own quantizer, an IR folder only OpenVINO runs."""
import os
import re
import sys

import numpy as np
import pytest
import yaml
from conftest import INSTANT, assert_one_line_error, data_opts, run_command

from segslim.builder import build_dataset
from segslim.config import load_config
from segslim.deploy.benchmark import benchmark, evaluate_engines
from segslim.deploy.cpu import cpu_features
from segslim.deploy.engines import create_predictor
from segslim.errors import UserError
from segslim.options import EngineOptions

ov = pytest.importorskip('openvino')
pytest.importorskip('nncf')
# NNCF's weights: 7 bits on CPUs without VNNI, where OpenVINO's INT8 kernels saturate on 8
OVERFLOW_FIX = 'first_layer_only' if cpu_features()['vnni'] else 'enable'


def ov_engine(model_dir, precision='fp32'):
    return create_predictor(model_dir, EngineOptions(backend='openvino', precision=precision,
                                                     input_shape=(1, 3, 64, 64)))


@pytest.fixture(scope='module')
def nncf_model(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp('nncf') / 'int8'
    proc = run_command('slim/quant/ptq.py', '--config', INSTANT, '--model_dir', exported['fp32'],
                       '--save_dir', out, '--quantizer', 'nncf', '--batch_nums', 8,
                       '--verify_images', 4, '--opts', *data_opts(exported['data']))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {'dir': str(out), 'log': proc.stdout + proc.stderr}


def test_nncf_writes_an_openvino_ir_that_runs_int8_on_openvino(nncf_model, exported):
    names = sorted(os.listdir(nncf_model['dir']))
    assert names == ['deploy.yaml', 'model.bin', 'model.xml'], names
    deploy = yaml.safe_load(open(os.path.join(nncf_model['dir'], 'deploy.yaml')))['Deploy']
    assert deploy['model'] == 'model.xml' and deploy['engine'] == 'openvino'
    assert deploy['quantized'] and deploy['calibration'] == {
        'method': 'nncf', 'images': 8, 'overflow_fix': OVERFLOW_FIX}
    # without VNNI every INT8 weight is within 7 bits (OpenVINO's kernels saturate on 8)
    weights = [op.get_data() for op in ov.Core().read_model(
        os.path.join(nncf_model['dir'], 'model.xml')).get_ordered_ops()
        if op.get_type_name() == 'Constant' and op.get_element_type() == ov.Type.i8]
    widest = max(np.abs(q.astype(int)).max() for q in weights)
    assert widest <= 64 if OVERFLOW_FIX == 'enable' else widest > 64, widest
    assert 'onnx' not in deploy
    int8 = ov_engine(nncf_model['dir'], 'int8')
    assert int8.precision == 'int8' and int8.ops.int8_conv_ops > 0
    dataset = build_dataset(load_config(INSTANT, opts=data_opts(exported['data'])),
                            'val_dataset')
    rows = evaluate_engines([ov_engine(exported['fp32']), int8], dataset)
    # a 20-iteration model with near-tied logits: NNCF's ranges cost it more than PTQ's, so
    # the bound only catches a broken model (the demo model's figures: docs/measurements.md)
    assert rows[1].miou >= rows[0].miou - 0.1, rows
    # the check ptq.py ran was on OpenVINO, against the FP32 export
    assert re.search(r'INT8 engine \(OpenVINO, \d+/\d+ convs INT8\): mIoU', nncf_model['log'])


def test_other_engines_refuse_an_ir_folder_and_benchmark_gives_it_openvino_rows(nncf_model,
                                                                                  exported):
    with pytest.raises(UserError, match='OpenVINO IR model.*use --backend openvino'):
        create_predictor(nncf_model['dir'], EngineOptions(backend='paddle'))
    report = benchmark([exported['fp32'], nncf_model['dir']], None, EngineOptions(),
                       shape=(1, 3, 64, 64), warmup=1, repeats=2, with_bf16=False,
                       backends=('paddle', 'openvino'))
    rows = [(os.path.basename(r.model_dir), r.backend, r.precision) for r in report.rows]
    assert rows == [('fp32', 'paddle', 'fp32'), ('fp32', 'openvino', 'fp32'),
                    ('int8', 'openvino', 'int8')], rows


def test_accuracy_control_checks_its_result_on_openvino(exported, nncf_model, tmp_path):
    # a bound the plain model meets: NNCF validates and returns it (its reverting loop costs
    # a ranking pass per op; docs/measurements.md has a run that reverts)
    out = tmp_path / 'ac'
    proc = run_command('slim/quant/ptq.py', '--config', INSTANT, '--model_dir', exported['fp32'],
                       '--save_dir', out, '--quantizer', 'nncf', '--batch_nums', 8,
                       '--verify_images', 0, '--max_miou_drop', 0.9, '--num_images', 2,
                       '--opts', *data_opts(exported['data']))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert re.search(r'NNCF accuracy control: OpenVINO INT8 mIoU [\d.]+ vs FP32 [\d.]+ on 2 '
                     r'val images \(bound 0.9000: met\)', log), log[-3000:]
    assert yaml.safe_load(open(out / 'deploy.yaml'))['Deploy']['calibration'] == {
        'method': 'nncf', 'images': 8, 'overflow_fix': OVERFLOW_FIX, 'max_miou_drop': 0.9}

    def fake_quantizers(folder):
        return open(os.path.join(folder, 'model.xml')).read().count('type="FakeQuantize"')
    assert fake_quantizers(out) == fake_quantizers(nncf_model['dir']) > 0


def test_nncf_bad_inputs_are_one_line(exported, tmp_path, monkeypatch):
    args = ['--config', INSTANT, '--model_dir', exported['fp32'], '--save_dir', tmp_path / 'x',
            '--batch_nums', 1, '--opts', *data_opts(exported['data'])]
    proc = run_command('slim/quant/ptq.py', '--quantizer', 'nncf', '--to_onnx', *args)
    assert_one_line_error(proc, '--quantizer nncf', 'not ONNX')
    proc = run_command('slim/quant/ptq.py', '--max_miou_drop', 0.01, *args)
    assert_one_line_error(proc, '--max_miou_drop', '--quantizer nncf')
    proc = run_command('slim/quant/ptq.py', '--quantizer', 'nncf', '--max_miou_drop', 2, *args)
    assert_one_line_error(proc, '--max_miou_drop', 'between 0 and 1', 'got 2')
    monkeypatch.setitem(sys.modules, 'nncf', None)  # as if not installed
    proc = run_command('slim/quant/ptq.py', '--quantizer', 'nncf', *args)
    assert_one_line_error(proc, '--quantizer nncf', 'pip install')


def test_nncf_is_told_a_transformer_is_one():
    """NNCF's documentation asks for model_type=TRANSFORMER on transformers: a MatMul of two
    computed tensors (attention) marks one; Linear layers' MatMuls of constants do not."""
    import nncf
    import openvino.opset13 as ops

    from segslim.quant.nncf import nncf_model_type

    rng = np.random.default_rng(0)

    def weight(*shape):  # fp16 weights behind a Convert, as a compressed IR stores them
        return ops.convert(ops.constant(rng.standard_normal(shape).astype(np.float16)),
                           'f32')

    def model(attention):
        x = ops.parameter([1, 6, 8], np.float32)
        q, k = ops.matmul(x, weight(8, 8), False, False), ops.matmul(x, weight(8, 8), False,
                                                                     False)
        if attention:
            out = ops.matmul(ops.softmax(ops.matmul(q, k, False, True), -1), x, False, False)
        else:
            out = ops.add(q, ops.matmul(k, ops.transpose(weight(8, 8), ops.constant(
                np.array([1, 0]))), False, False))
        return ov.Model([out], [x])

    assert nncf_model_type(nncf, model(attention=True)) == nncf.ModelType.TRANSFORMER
    assert nncf_model_type(nncf, model(attention=False)) is None
