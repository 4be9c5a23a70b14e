"""Reports name what the engine ran; every user mistake is exit code 2 and one line; GPU and
TensorRT calls checked against a recording fake Config (no GPU here)."""
import json
import os

import numpy as np
import pytest
import yaml
from conftest import (
    INSTANT,
    ROOT,
    assert_one_line_error,
    data_opts,
    run_cli,
    run_command,
    table_rows,
)

from segslim.deploy import paddle_engine as predictor_mod
from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
from segslim.errors import UserError
from segslim.options import EngineOptions

PPLITE = os.path.join(ROOT, 'configs', 'quick_start', 'pp_liteseg_optic_disc_512x512_1k.yml')


# What ran ---------------------------------------------------------------------------------
def test_qat_model_without_int8_kernels_is_labelled_so(exported, tmp_path):
    pred = Predictor(exported['int8'], EngineOptions(enable_mkldnn=False))
    assert pred.precision == 'fp32' and pred.precision_note == 'QAT model, no INT8 kernels'
    # every quantized layer INT8: the label, not the timing per kind, is checked here
    assert Predictor(exported['int8'], EngineOptions(input_shape=(1, 3, 64, 64),
                                                     int8_layers='all')).precision == 'int8'
    out = tmp_path / 'r.json'
    proc = run_cli('deploy/python/benchmark.py', '--model_dirs', exported['fp32'],
                   exported['int8'], '--device', 'cpu', '--enable_mkldnn', 'False',
                   '--input_shape', 1, 3, 64, 64, '--warmup', 1, '--repeats', 2, '--json', out,
                   '--no_ceiling')
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.load(open(out))['rows']
    assert [(r['precision'], r['precision_note']) for r in rows] == [
        ('fp32', None), ('fp32', 'QAT model, no INT8 kernels')]
    types = [row[2] for row in table_rows(proc.stdout)[1:3]]
    assert types == ['FP32', 'FP32 (QAT model, no INT8 kernels)'], types


@pytest.mark.parametrize('args,words', [
    (['--precision', 'fp16'], ['fp16', 'TensorRT']),
    (['--use_trt', '--precision', 'bf16'], ['bf16', 'oneDNN']),
    (['--precision', 'bf16', '--enable_mkldnn', 'False'], ['bf16', 'oneDNN']),
    (['--repeats', 0], ['--repeats', 'positive']),
    (['--json', '/nonexistent/folder/r.json'], ['--json', 'does not exist']),
    (['--markdown', '.'], ['--markdown', 'folder']),
])
def test_benchmark_refuses_what_would_not_run_as_asked(exported, args, words):
    proc = run_command('deploy/python/benchmark.py', '--model_dirs', exported['fp32'], '--device',
                       'cpu', '--input_shape', 1, 3, 64, 64, '--repeats', 1, *args)
    assert_one_line_error(proc, *words)


def test_agreement_uses_one_restore_rule(fp32_run, tmp_path):
    """With a Resize in the deploy transforms, an FP32 engine and the same FP32 model agree
    on every pixel once both are restored alike."""
    from segslim import builder
    from segslim.config import load_config
    from segslim.deploy.benchmark import evaluate_engines
    from segslim.export import export_inference_model
    from segslim.train.checkpoint import load_weights
    cfg = load_config(INSTANT, opts=data_opts(fp32_run['data']))
    cfg['val_dataset']['transforms'] = [{'type': 'Resize', 'target_size': [48, 48]},
                                        {'type': 'Normalize'}]
    model = builder.build_model(cfg)
    load_weights(model, os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'))
    export_inference_model(model, cfg, str(tmp_path / 'm'))
    dataset = builder.build_dataset(cfg, 'val_dataset')
    pred = Predictor(str(tmp_path / 'm'), EngineOptions(enable_mkldnn=False))
    assert evaluate_engines([pred], dataset, 4, model)[0].model_agreement >= 0.99999


def test_engine_miou_equals_val_py(exported, fp32_run, tmp_path):
    out = tmp_path / 'val.json'
    proc = run_cli('val.py', '--config', INSTANT, '--model_path',
                   os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'), '--json', out,
                   '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = tmp_path / 'bench.json'
    proc = run_cli('deploy/python/benchmark.py', '--config', INSTANT, '--model_dirs',
                   exported['fp32'], '--device', 'cpu', '--no_bf16', '--no_ceiling',
                   '--input_shape', 1, 3, 64, 64, '--repeats', 1, '--json', report,
                   '--markdown', tmp_path / 'bench.md',
                   '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.load(open(report))['rows']
    assert len(rows) == 1  # --no_bf16: no bf16 row even on a bf16 CPU
    assert abs(rows[0]['miou'] - json.load(open(out))['miou']) < 1e-3
    text = (tmp_path / 'bench.md').read_text()
    assert table_rows(text)[0][:4] == ['Model', 'Engine', 'Type', 'mIoU'] and 'ISA:' in text


def test_op_summary_counts_matmuls(tmp_path):
    from segslim._paddle import paddle
    from segslim.deploy.paddle_engine import op_summary

    class ConvThenLinear(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.fc = paddle.nn.Linear(8, 8)

        def forward(self, x):
            y = self.conv(x).transpose([0, 2, 3, 1])
            return self.fc(y)

    net = ConvThenLinear()
    net.eval()
    paddle.jit.save(paddle.jit.to_static(net, input_spec=[paddle.static.InputSpec(
        [1, 3, 8, 8], 'float32', 'x')]), str(tmp_path / 'model'))
    summary = op_summary(str(tmp_path / 'model.pdmodel'))
    assert summary.conv_ops == 1 and summary.matmul_ops == 1
    assert summary.quantizable_ops == 2 and summary.int8_ops == 0
    assert summary.by_type['conv2d'] == (0, 1) and len(summary.fp32_ops) == 2


def test_cpu_features_parsing(tmp_path, monkeypatch):
    from segslim.deploy.cpu import cpu_features
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 2, 5}, raising=False)
    cases = {'fpu avx2 avx512f avx512_vnni avx512_bf16': ('AVX-512 VNNI', True),
             'fpu avx2 avx512f avx512_bf16 amx_bf16 amx_int8 amx_tile': ('AMX', True),
             'fpu avx2 avx_vnni': ('AVX-VNNI', True), 'fpu avx2': ('AVX2', False)}
    for flags, (isa, vnni) in cases.items():
        info = tmp_path / 'cpuinfo'
        info.write_text(f'model name\t: Test CPU\nflags\t\t: {flags}\n')
        found = cpu_features(str(info), ask_paddle=False)
        assert found['model'] == 'Test CPU' and found['isa'] == isa and found['vnni'] == vnni
        assert found['amx'] == ('amx_int8' in flags)
        assert found['cores'] == 3  # the cores this process may use, not the machine's


# Every mistake: exit code 2 and one line -------------------------------------------------
@pytest.mark.parametrize('opt,words', [
    ('model.arm_type=Nope', ['model', 'PPLiteSeg', 'arm_type']),
    ("model.num_classes='two'", ['model.num_classes', 'integer']),
    ('loss.types=[1]', ['loss.types[0]', 'mapping']),
    ("loss.coef=['a']", ['loss.coef[0]', 'number']),
    ('quant_config.skip=[1]', ['quant_config.skip']),
    ("quant_config.onnx_format='yes'", ['quant_config.onnx_format']),
])
def test_config_mistakes_are_exit_2(fp32_run, tmp_path, opt, words):
    script = 'slim/quant/qat_train.py' if opt.startswith('quant') else 'train.py'
    cfg = PPLITE if 'arm_type' in opt else INSTANT
    proc = run_command(script, '--config', cfg, '--iters', 1, '--save_dir', tmp_path,
                       '--opts', opt, 'model.backbone.pretrained=None' if cfg == PPLITE else
                       'iters=1', *data_opts(fp32_run['data']))
    assert_one_line_error(proc, *words)


def test_scalar_legacy_learning_rate(fp32_run, tmp_path):
    cfg = yaml.safe_load(open(INSTANT))
    cfg['_base_'] = os.path.join(os.path.dirname(INSTANT), cfg['_base_'])
    cfg['lr_scheduler'] = None
    cfg['learning_rate'] = 0.01
    path = tmp_path / 'legacy.yml'
    path.write_text(yaml.safe_dump(cfg))
    proc = run_command('train.py', '--config', path, '--iters', 1, '--save_dir', tmp_path / 'o',
                       '--opts', *data_opts(fp32_run['data']))
    assert_one_line_error(proc, '`learning_rate`', 'mapping')


@pytest.mark.parametrize('script,args,words', [
    ('train.py', ['--save_interval', 0], ['--save_interval', 'positive']),
    ('train.py', ['--log_iters', 0], ['--log_iters', 'positive']),
    ('train.py', ['--batch_size', 0], ['--batch_size', 'positive']),
    ('deploy/python/infer.py', ['--batch_size', 0], ['--batch_size', 'positive']),
])
def test_zero_counts_are_refused_not_clamped(exported, tmp_path, script, args, words):
    if script == 'train.py':
        base = ['--config', INSTANT, '--save_dir', tmp_path]
    else:
        base = ['--config', exported['fp32'], '--image_path', exported['data']]
    assert_one_line_error(run_command(script, *base, *args), *words)


def test_val_json_unwritable(fp32_run, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    proc = run_command('val.py', '--config', INSTANT, '--model_path',
                       os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'), '--json',
                       blocker / 'm.json', '--opts', *data_opts(fp32_run['data']))
    assert_one_line_error(proc, '--json')


def test_allow_partial_from_the_cli(fp32_run, tmp_path):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    common = ['--config', PPLITE, '--model_path', weights, '--iters', 1, '--seed', 0,
              '--batch_size', 2, '--opts', 'model.backbone.pretrained=None',
              "train_dataset.transforms=[{'type': 'Resize', 'target_size': [64, 64]}, "
              "{'type': 'Normalize'}]", *data_opts(fp32_run['data'])]
    proc = run_command('slim/quant/qat_train.py', '--save_dir', tmp_path / 'a', *common)
    assert_one_line_error(proc, 'does not fit')
    proc = run_cli('slim/quant/qat_train.py', '--save_dir', tmp_path / 'b', '--allow_partial',
                   *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / 'b' / 'iter_1' / 'model.pdparams').is_file()


# Bugs -------------------------------------------------------------------------------------
def test_pretrained_urls_are_cached_apart(monkeypatch, tmp_path):
    import paddleseg.utils.utils as seg_utils

    from segslim.train import checkpoint
    calls = []

    def fake_download(url, savepath, cover, extrapath, extraname, filename):
        calls.append(url)
        folder = os.path.join(str(tmp_path), extraname)
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, filename), 'w').write(url)
        return folder
    monkeypatch.setattr(seg_utils, 'download_file_and_uncompress', fake_download)
    monkeypatch.setattr(checkpoint, 'can_reach', lambda host: True)
    a = checkpoint.local_weights('https://host/models/a_model/model.pdparams', 'model.pretrained')
    b = checkpoint.local_weights('https://host/models/b_model/model.pdparams', 'model.pretrained')
    assert a != b and open(a).read().endswith('a_model/model.pdparams')
    assert open(b).read().endswith('b_model/model.pdparams') and len(calls) == 2


def test_amp_loss_scale_is_checkpointed(tmp_path):
    from segslim._paddle import paddle
    from segslim.options import TrainOptions
    from segslim.train.loop import Trainer, restore_scaler

    class FakeScaler:
        def __init__(self, scale):
            self.state = {'scale': np.float32(scale), 'incr_count': 3}

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, state):
            self.state = dict(state)

    model = paddle.nn.Conv2D(3, 2, 1)
    sched = paddle.optimizer.lr.PolynomialDecay(0.01, 10)
    opt = paddle.optimizer.SGD(sched, parameters=model.parameters())
    trainer = Trainer(model, None, None, opt, sched, {}, {}, TrainOptions(iters=10, batch_size=1,
                                                                  save_dir=str(tmp_path)))
    trainer.scaler = FakeScaler(512.0)
    trainer._save(3, None)
    with open(tmp_path / 'iter_3' / 'train_state.json') as f:
        state = json.load(f)
    assert state['scaler']['scale'] == 512.0 and state['scaler']['incr_count'] == 3
    fresh = FakeScaler(1024.0)
    restore_scaler(fresh, state)
    assert fresh.state['scale'] == 512.0


# TensorRT / GPU against a recording fake --------------------------------------------------
class FakeInference:
    """Stands in for paddle.inference: records every Config call in order."""

    class PrecisionType:
        Float32, Half, Int8 = 'Float32', 'Half', 'Int8'

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail
        outer = self

        class Config:
            def __init__(self, model, params):
                outer.calls.append(('Config', os.path.basename(model)))

            def __getattr__(self, name):
                def record(*args, **kwargs):
                    outer.calls.append((name, args, kwargs))
                    if name == 'collect_shape_range_info':
                        open(args[0], 'w').write('shapes')
                    if name == 'pass_builder':
                        return PassBuilder()
                return record

        class PassBuilder:
            def __getattr__(self, name):
                return lambda *args, **kwargs: outer.calls.append((name, args, kwargs))
        self.Config = Config

    def create_predictor(self, config):
        if self.fail:
            raise RuntimeError('TensorRT build failed')
        outer = self

        class Handle:
            def reshape(self, shape):
                self.shape = shape

            def copy_from_cpu(self, data):
                outer.last = data.shape

            def copy_to_cpu(self):
                n, _, h, w = outer.last
                return np.zeros((n, h, w), np.int32)

        class FakePredictor:
            handle = Handle()

            def get_input_names(self):
                return ['img']

            def get_output_names(self):
                return ['out']

            def get_input_handle(self, name):
                return self.handle

            def get_output_handle(self, name):
                return self.handle

            def run(self):
                outer.calls.append(('run',))
        return FakePredictor()

    def names(self):
        return [c[0] for c in self.calls]

    def call(self, name):
        return next(c for c in self.calls if c[0] == name)


@pytest.fixture
def fake_pi(monkeypatch):
    fake = FakeInference()
    monkeypatch.setattr(predictor_mod, 'pi', fake)
    monkeypatch.setattr(predictor_mod, 'program_input_names', lambda path: ['img'])
    return fake


def gpu(**kw):
    return EngineOptions(device='gpu', use_trt=True, input_shape=(1, 3, 512, 1024), **kw)


def test_trt_int8_for_qat_model(exported, fake_pi):
    from segslim.deploy.results import PassChange
    pred = Predictor(exported['int8'], gpu(precision='fp32'))
    assert pred.precision == 'int8'
    names = fake_pi.names()
    assert names.index('enable_use_gpu') < names.index('enable_tensorrt_engine') < \
        names.index('set_trt_dynamic_shape_info')
    trt = fake_pi.call('enable_tensorrt_engine')[2]
    assert trt['precision_mode'] == 'Int8' and trt['use_calib_mode'] is False
    assert trt['use_static'] is False and trt['min_subgraph_size'] == 3
    lo, hi, opt = fake_pi.call('set_trt_dynamic_shape_info')[1]
    assert list(lo) == ['img'] and opt['img'] == [1, 3, 512, 1024]
    assert hi['img'][2:] == [2048, 2048] and lo['img'][2:] == [32, 32]
    assert 'enable_mkldnn_int8' not in names and 'disable_gpu' not in names
    assert 'append_pass' not in names and pred.passes == PassChange()
    with pytest.raises(UserError, match='beyond the TensorRT shape range'):
        pred.run(np.zeros((1, 3, 4096, 512), np.float32))


@pytest.mark.parametrize('asked,mode', [('fp32', 'Float32'), ('fp16', 'Half')])
def test_trt_float_precisions(exported, fake_pi, asked, mode):
    pred = Predictor(exported['fp32'], gpu(precision=asked))
    assert pred.precision == asked
    assert fake_pi.call('enable_tensorrt_engine')[2]['precision_mode'] == mode


def test_trt_auto_tune_uses_a_temporary_shape_file(exported, fake_pi):
    import gc
    pred = Predictor(exported['fp32'], gpu(enable_auto_tune=True))
    collected = fake_pi.call('collect_shape_range_info')[1][0]
    used = fake_pi.call('enable_tuned_tensorrt_dynamic_shape')[1]
    assert used == (collected, True)
    assert not collected.startswith(os.path.abspath(exported['fp32']))
    assert os.path.exists(collected) and 'set_trt_dynamic_shape_info' not in fake_pi.names()
    del pred
    gc.collect()
    assert not os.path.exists(collected)
    assert not [n for n in os.listdir(exported['fp32']) if n.endswith('.pbtxt')]


def test_trt_auto_tune_on_fixed_shape_export(exported, fake_pi, tmp_path):
    import shutil
    fixed = tmp_path / 'fixed'
    shutil.copytree(exported['fp32'], fixed)
    deploy = yaml.safe_load(open(fixed / 'deploy.yaml'))
    deploy['Deploy']['input_shape'] = [1, 3, 64, 64]
    (fixed / 'deploy.yaml').write_text(yaml.safe_dump(deploy))
    with pytest.raises(UserError, match='fixed input shape'):
        Predictor(str(fixed), gpu(enable_auto_tune=True))


def test_trt_failure_hint_names_tensorrt(exported, monkeypatch):
    monkeypatch.setattr(predictor_mod, 'pi', FakeInference(fail=True))
    with pytest.raises(UserError, match='TensorRT') as err:
        Predictor(exported['fp32'], gpu())
    assert 'device cpu' not in str(err.value)


def test_gpu_without_trt_runs_qat_model_in_fp32(exported, fake_pi):
    pred = Predictor(exported['int8'], EngineOptions(device='gpu', precision='int8'))
    assert pred.precision == 'fp32' and pred.precision_note == 'QAT model, no INT8 kernels'
    assert 'enable_tensorrt_engine' not in fake_pi.names()


def test_xpu_and_npu_configs(exported, fake_pi):
    Predictor(exported['fp32'], EngineOptions(device='xpu'))
    Predictor(exported['fp32'], EngineOptions(device='npu'))
    assert 'enable_xpu' in fake_pi.names()
    assert fake_pi.call('enable_custom_device')[1] == ('npu',)


def test_input_name_is_read_from_the_program(exported):
    from segslim.program import program_input_names
    assert program_input_names(os.path.join(exported['fp32'], 'model.pdmodel')) == ['x']


def test_op_onednn_rejects_runs_in_paddle_kernels(exported, monkeypatch):
    """oneDNN rejecting one op type (bf16 adaptive pool2d on ANN/PSPNet at 1024x512) moves
    that op to Paddle's kernels, keeps the rest in oneDNN and says so."""
    fake = FakeInference()
    configs = []
    real_config = fake.Config

    class Config(real_config):
        def __init__(self, model, params):
            super().__init__(model, params)
            configs.append(self)
            self.mkldnn_ops = None

        def set_mkldnn_op(self, ops):
            self.mkldnn_ops = set(ops)
    fake.Config = Config
    real_create = fake.create_predictor

    def create(config):
        if config.mkldnn_ops is None or 'pool2d' in config.mkldnn_ops:
            raise RuntimeError('(Fatal) oneDNN failed\n  [operator < pool2d > error]')
        return real_create(config)
    fake.create_predictor = create
    monkeypatch.setattr(predictor_mod, 'pi', fake)
    pred = Predictor(exported['fp32'], EngineOptions(precision='bf16',
                                                     input_shape=(1, 3, 64, 64)))
    assert len(configs) == 2 and 'conv2d' in configs[-1].mkldnn_ops
    assert 'pool2d' not in configs[-1].mkldnn_ops
    assert 'pool2d run in Paddle' in pred.fallback and pred.precision == 'bf16'
    # the resize pass is appended on CPU whatever the precision
    from segslim._paddle import paddle
    from segslim.compat import pass_name
    assert ('append_pass', (pass_name('interpolate_mkldnn_pass', paddle.__version__),),
            {}) in fake.calls
