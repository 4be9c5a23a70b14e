"""PaddleSeg 2.8 drop-in: its client API reads our exports, its command lines run unchanged,
its configs build (nested components, per-script required keys)."""
import json
import os
import re

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
    tree_digest,
)
from PIL import Image

QUICK = os.path.join(ROOT, 'configs', 'quick_start', 'bisenet_optic_disc_512x512_1k.yml')
# Every flag of PaddleSeg 2.8's counterpart scripts (release 2.8.0).
UPSTREAM_FLAGS = {
    'train': (
        '--amp_level --batch_size --config --data_format --device --do_eval --iters '
        '--keep_checkpoint_max --learning_rate --log_iters --num_workers --opts '
        '--precision --profiler_options --repeats --resume_model --save_dir '
        '--save_interval --seed --use_ema --use_vdl'),
    'val': (
        '--auc_roc --aug_eval --config --crop_size --data_format --device '
        '--flip_horizontal --flip_vertical --is_slide --model_path --num_workers --opts '
        '--scales --stride'),
    'export': '--config --input_shape --model_path --output_op --save_dir',
    'qat_train': (
        '--batch_size --config --device --do_eval --iters --keep_checkpoint_max '
        '--learning_rate --log_iters --model_path --num_workers --opts --resume_model '
        '--save_dir --save_interval --seed --use_vdl'),
    'qat_val': (
        '--aug_eval --config --crop_size --data_format --device --flip_horizontal '
        '--flip_vertical --is_slide --model_path --num_workers --opts --scales --stride'),
    'qat_export': '--config --model_path --output_op --save_dir --with_softmax --without_argmax',
    'ptq': '--batch_nums --batch_size --config --model_dir --opts',
    'infer': (
        '--auto_tuned_shape_file --batch_size --benchmark --config --cpu_threads --device '
        '--enable_auto_tune --enable_mkldnn --image_path --min_subgraph_size --model_name '
        '--precision --print_detail --save_dir --use_trt --with_argmax'),
}


def write_cfg(tmp_path, name, cfg):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def instant_cfg(data):
    """The instant config resolved into one dict pointing at `data`."""
    from segslim.config import load_config
    return load_config(INSTANT, opts=data_opts(data))


# Export contract -----------------------------------------------------------------------
def test_heads_follow_paddleseg_contract(exported):
    from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
    from segslim.options import EngineOptions
    x = np.zeros((2, 3, 64, 64), np.float32)
    for kind in ('fp32', 'int8'):
        deploy = yaml.safe_load(open(os.path.join(exported[kind], 'deploy.yaml')))['Deploy']
        assert deploy['output_op'] == 'argmax' and deploy['output_dtype'] == 'int32'
        pred = Predictor(exported[kind], EngineOptions(precision='fp32', input_shape=x.shape))
        y = pred.run(x)
        assert y.shape == (2, 64, 64) and y.dtype == np.int32  # N,H,W as WrappedModel
        assert pred.labels(x).shape == (2, 64, 64)


def test_older_n1hw_exports_still_read():
    from segslim.deploy.paddle_engine import PaddlePredictor as Predictor
    pred = Predictor.__new__(Predictor)
    pred.deploy = {}
    old = np.arange(8, dtype=np.int32).reshape(2, 1, 2, 2)
    assert pred.to_labels(old).shape == (2, 2, 2)
    assert (pred.to_labels(old) == old[:, 0]).all()
    # an upstream qat_export --without_argmax writes no output_op into deploy.yaml
    logits = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    assert (pred.to_labels(logits) == logits.argmax(1)).all()


def test_paddleseg_client_api_reads_our_exports(exported, tmp_path):
    """What PaddleSeg 2.8's deploy/python/infer.py does, through the wheel's own API."""
    from paddle.inference import Config, create_predictor
    from paddleseg.deploy.infer import DeployConfig
    from paddleseg.utils.visualize import get_pseudo_color_map
    image_dir = os.path.join(exported['data'], 'JPEGImages')
    images = sorted(os.path.join(image_dir, n) for n in os.listdir(image_dir))[:3]
    ours_dir = {}
    for kind in ('fp32', 'int8'):
        out = tmp_path / kind
        proc = run_cli('deploy/python/infer.py', '--config',
                       os.path.join(exported[kind], 'deploy.yaml'), '--image_path', image_dir,
                       '--save_dir', out, '--device', 'cpu')
        assert proc.returncode == 0, proc.stderr[-2000:]
        ours_dir[kind] = out
    for kind in ('fp32', 'int8'):
        cfg = DeployConfig(os.path.join(exported[kind], 'deploy.yaml'))
        config = Config(cfg.model, cfg.params)
        config.disable_gpu()
        config.disable_glog_info()
        config.enable_mkldnn()
        config.set_cpu_math_library_num_threads(2)
        predictor = create_predictor(config)
        handle_in = predictor.get_input_handle(predictor.get_input_names()[0])
        handle_out = predictor.get_output_handle(predictor.get_output_names()[0])
        data = np.array([cfg.transforms({'img': p})['img'] for p in images])
        handle_in.reshape(data.shape)
        handle_in.copy_from_cpu(data)
        predictor.run()
        results = handle_out.copy_to_cpu()
        assert results.shape == (3, 64, 64)
        same = total = 0
        for row, path in zip(results, images):
            theirs = np.asarray(get_pseudo_color_map(row))  # crashed on N,1,H,W exports
            name = os.path.splitext(os.path.basename(path))[0] + '.png'
            ours = np.asarray(Image.open(ours_dir[kind] / name))
            assert theirs.shape == ours.shape
            same += int((theirs == ours).sum())
            total += ours.size
        if kind == 'fp32':
            assert same == total
        else:  # the client runs the fake-quant ops in FP32, ours runs oneDNN INT8
            assert same / total >= 0.99


# Command lines ---------------------------------------------------------------------------

@pytest.mark.parametrize('command', sorted(UPSTREAM_FLAGS))
def test_every_upstream_flag_is_accepted(command):
    from segslim.cli import commands, flags
    parsers = []

    def capture(parser, main, argv=None):
        parsers.append(parser)
    original, flags.entry = flags.entry, capture
    try:
        getattr(commands, command)([])
    finally:
        flags.entry = original
    ours = set(parsers[0]._option_string_actions)
    missing = [flag for flag in UPSTREAM_FLAGS[command].split() if flag not in ours]
    assert not missing, missing


def test_upstream_style_chain(fp32_run, tmp_path):
    """qat_train without --model_path and --save_interval > --iters, qat_export into the
    training folder from iter_N, infer with --flag=True arguments and a file list."""
    run = tmp_path / 'quant'
    cfg_path = write_cfg(tmp_path, 'pretrained.yml', dict(
        yaml.safe_load(open(INSTANT)), _base_=QUICK,
        model={'pretrained': os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')}))
    proc = run_cli('slim/quant/qat_train.py', '--config', cfg_path, '--iters', 3,
                   '--save_interval', 1000, '--learning_rate', 0.001, '--save_dir', run,
                   '--log_iters', 1, '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'QAT normally starts from trained FP32 weights' in proc.stdout
    assert "the config's pretrained weights" in proc.stdout
    assert os.path.isfile(run / 'iter_3' / 'model.pdparams')  # the last iteration is saved
    before = tree_digest(run)
    proc = run_cli('slim/quant/qat_export.py', '--config', cfg_path, '--model_path',
                   run / 'iter_3' / 'model.pdparams', '--save_dir', run,
                   '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = tree_digest(run)
    assert {k: after[k] for k in before} == before  # the run's files are untouched
    assert {'model.pdmodel', 'model.pdiparams', 'deploy.yaml'} <= set(after) - set(before)

    listing = tmp_path / 'lists' / 'images.txt'
    listing.parent.mkdir()
    image_dir = os.path.join(fp32_run['data'], 'JPEGImages')
    names = sorted(os.listdir(image_dir))[:2]
    listing.write_text(''.join('{} {}\n'.format(os.path.relpath(
        os.path.join(image_dir, n), listing.parent), 'unused_label.png') for n in names))
    out = tmp_path / 'masks'
    proc = run_cli('deploy/python/infer.py', '--config', run / 'deploy.yaml', '--image_path',
                   listing, '--save_dir', out, '--device=cpu', '--use_trt=False',
                   '--enable_auto_tune', 'False', '--enable_mkldnn=True', '--benchmark=True',
                   '--print_detail', 'False', '--model_name', 'bisenet_qat', '--precision',
                   'int8', '--cpu_threads', 2, '--with_argmax')
    assert proc.returncode == 0, proc.stderr[-2000:]
    masks = sorted(os.path.relpath(os.path.join(r, n), out)
                   for r, _, files in os.walk(out) for n in files)
    assert len(masks) == 2 and all(m.endswith('.png') for m in masks), masks
    m = re.search(r'model: bisenet_qat, engine: paddle, precision: int8.*\n.*per image: preprocess '
                  r'([0-9.]+) ms, inference ([0-9.]+) ms, postprocess ([0-9.]+) ms', proc.stdout)
    assert m and float(m.group(2)) > 0, proc.stdout[-2000:]


@pytest.mark.parametrize('flag', ['--enable_mkldnn', '--use_trt', '--benchmark'])
def test_bool_flag_rejects_non_boolean(exported, flag):
    proc = run_command('deploy/python/infer.py', '--config', exported['fp32'], '--image_path',
                       exported['data'], flag, 'maybe')
    assert_one_line_error(proc, flag, 'True or False', "'maybe'")


def test_bool_flag_value_is_honoured():
    from segslim.cli import flags
    p = flags.ArgumentParser()
    flags.add_engine_args(p)
    assert p.parse_args(['--enable_mkldnn', 'False']).enable_mkldnn is False
    assert p.parse_args(['--enable_mkldnn=false']).enable_mkldnn is False
    assert p.parse_args(['--use_trt']).use_trt is True
    assert p.parse_args([]).use_trt is False and p.parse_args([]).enable_mkldnn is True


def test_infer_folder_keeps_subfolders(exported, tmp_path):
    src = os.path.join(exported['data'], 'JPEGImages', 'N0000.jpg')
    for sub in ('a', 'b/c'):
        os.makedirs(tmp_path / 'imgs' / sub)
        Image.open(src).save(tmp_path / 'imgs' / sub / 'same.jpg')
    proc = run_cli('deploy/python/infer.py', '--config', exported['int8'], '--image_path',
                   tmp_path / 'imgs', '--save_dir', tmp_path / 'out', '--device', 'cpu')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / 'out' / 'a' / 'same.png').is_file()
    assert (tmp_path / 'out' / 'b' / 'c' / 'same.png').is_file()


def test_infer_file_list_with_missing_entry(exported, tmp_path):
    listing = tmp_path / 'list.txt'
    listing.write_text('nope.jpg\n')
    proc = run_command('deploy/python/infer.py', '--config', exported['int8'], '--image_path',
                       listing)
    assert_one_line_error(proc, 'nope.jpg', 'list.txt')


def test_train_without_seed_draws_and_keeps_one(instant_data, tmp_path):
    proc = run_cli('train.py', '--config', INSTANT, '--iters', 2, '--save_dir', tmp_path,
                   '--opts', *data_opts(instant_data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'using seed (\d+) \(pass --seed \1', proc.stdout)
    assert m, proc.stdout[-2000:]
    with open(tmp_path / 'iter_2' / 'train_state.json') as f:
        assert json.load(f)['seed'] == int(m.group(1))


def test_repeats_lengthens_the_epoch(instant_data, tmp_path):
    # 8 images, batch 2: 4 iterations an epoch, 8 with --repeats 2
    epochs = []
    for repeats in (1, 2):
        proc = run_cli('train.py', '--config', INSTANT, '--iters', 6, '--log_iters', 6,
                       '--seed', 1, '--repeats', repeats, '--save_dir', tmp_path / str(repeats),
                       '--opts', *data_opts(instant_data))
        assert proc.returncode == 0, proc.stderr[-2000:]
        epochs.append(int(re.search(r'epoch: (\d+), iter: 6/6', proc.stdout).group(1)))
    assert epochs == [2, 1]


def test_profiler_options(instant_data, tmp_path):
    prof = tmp_path / 'prof.log'
    proc = run_cli('train.py', '--config', INSTANT, '--iters', 3, '--seed', 0, '--save_dir',
                   tmp_path / 'run', '--profiler_options',
                   f'batch_range=[1,2];profile_path={prof};exit_on_finished=false',
                   '--opts', *data_opts(instant_data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert prof.exists()
    proc = run_command('train.py', '--config', INSTANT, '--save_dir', tmp_path / 'bad',
                       '--profiler_options', 'nonsense', '--opts', *data_opts(instant_data))
    assert_one_line_error(proc, '--profiler_options')


def test_device_the_build_lacks_is_one_line(fp32_run):
    proc = run_command('val.py', '--config', INSTANT, '--device', 'xpu', '--model_path',
                       os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'))
    assert_one_line_error(proc, '--device xpu', 'XPU')


def test_data_format_nhwc_is_deeplabv3p_only(tmp_path):
    proc = run_command('train.py', '--config', INSTANT, '--data_format', 'NHWC', '--save_dir',
                       tmp_path)
    assert_one_line_error(proc, 'NHWC', 'DeepLabV3P', 'BiSeNetV2')


def test_data_format_nhwc_trains_deeplabv3p(instant_data, tmp_path):
    cfg = yaml.safe_load(open(INSTANT))
    cfg['_base_'] = os.path.join(ROOT, 'configs', 'quick_start',
                                 'deeplabv3p_resnet18_optic_disc_512x512_1k.yml')
    cfg['model'] = {'backbone': {'pretrained': None}}
    cfg['loss'] = {'types': [{'type': 'CrossEntropyLoss'}], 'coef': [1]}
    path = write_cfg(tmp_path, 'dlv3p.yml', cfg)
    proc = run_cli('train.py', '--config', path, '--iters', 2, '--data_format', 'NHWC',
                   '--do_eval', '--save_interval', 2, '--seed', 0, '--save_dir', tmp_path / 'o',
                   '--opts', *data_opts(instant_data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'mIoU' in proc.stdout
    saved = yaml.safe_load(open(tmp_path / 'o' / 'config.yaml'))
    assert saved['model']['data_format'] == 'NHWC'


def test_val_auc_roc_and_data_format(fp32_run):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    found = []
    for value in ('True', 'False'):
        proc = run_cli('val.py', '--config', INSTANT, '--model_path', weights, '--auc_roc',
                       value, '--data_format', 'NCHW', '--opts', *data_opts(fp32_run['data']))
        assert proc.returncode == 0, proc.stderr[-2000:]
        found.append(re.search(r'Auc_roc: ([0-9.]+)', proc.stdout))
    assert found[0] and 0.5 < float(found[0].group(1)) <= 1.0 and found[1] is None


def test_auc_roc_matches_sklearn_on_known_scores():
    from sklearn.metrics import roc_auc_score

    from segslim.train.evaluate import ScoreCollector
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 8, 8)).astype(np.float32)
    label = (rng.random((8, 8)) > 0.5).astype(np.int64)
    label[0, :3] = 255
    col = ScoreCollector(2, 255)
    col.update(logits, label)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    valid = label != 255
    assert abs(col.compute() - roc_auc_score(label[valid], probs[1][valid])) < 1e-6


def test_export_defaults_and_overrides(fp32_run, tmp_path):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    proc = run_cli('export.py', '--config', INSTANT, '--model_path', weights, '--output_op',
                   'argmax', '--with_softmax', '--input_shape', 1, 3, 64, 64, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    deploy = yaml.safe_load(open(tmp_path / 'output' / 'inference_model' / 'deploy.yaml'))
    assert deploy['Deploy']['output_op'] == 'softmax'  # the alias wins, as upstream
    assert deploy['Deploy']['input_shape'] == [1, 3, 64, 64]
    proc = run_command('export.py', '--config', INSTANT, '--model_path', weights, '--input_shape',
                       0, 3, 64, 64, '--save_dir', tmp_path / 'x')
    assert_one_line_error(proc, '--input_shape', 'positive')
    proc = run_command('export.py', '--config', INSTANT, '--model_path', weights, '--input_shape',
                       3, 64, 64, '--save_dir', tmp_path / 'y')
    assert_one_line_error(proc, '--input_shape', 'N C H W')


@pytest.mark.parametrize('script', ['val.py', 'export.py'])
def test_model_path_falls_back_on_pretrained(fp32_run, tmp_path, script):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    extra = ['--save_dir', tmp_path / 'out'] if script == 'export.py' else []
    proc = run_cli(script, '--config', INSTANT, *extra, '--opts',
                   f'model.pretrained={weights}', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'No --model_path: using model.pretrained' in proc.stdout
    proc = run_command(script, '--config', INSTANT, *extra, '--opts', *data_opts(fp32_run['data']))
    assert_one_line_error(proc, '--model_path', 'model.pretrained')


@pytest.mark.parametrize('script', ['slim/quant/qat_val.py', 'slim/quant/qat_export.py'])
def test_qat_scripts_fall_back_on_pretrained(qat_run, tmp_path, script):
    weights = os.path.join(qat_run['dir'], 'best_model', 'model.pdparams')
    extra = ['--save_dir', tmp_path / 'out'] if 'export' in script else []
    proc = run_cli(script, '--config', INSTANT, *extra, '--opts',
                   f'model.pretrained={weights}', *data_opts(qat_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'No --model_path' in proc.stdout


# Configs -----------------------------------------------------------------------------------
def test_scripts_require_only_the_keys_they_use(fp32_run, tmp_path):
    weights = os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams')
    full = instant_cfg(fp32_run['data'])
    lean = {'model': full['model'], 'val_dataset': full['val_dataset']}
    path = write_cfg(tmp_path, 'val_only.yml', lean)
    proc = run_cli('val.py', '--config', path, '--model_path', weights)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model_only = write_cfg(tmp_path, 'model_only.yml',
                           {'model': dict(full['model'], num_classes=2)})
    proc = run_cli('export.py', '--config', model_only, '--model_path', weights, '--save_dir',
                   tmp_path / 'exp')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / 'exp' / 'model.pdmodel').is_file()
    no_val = {k: v for k, v in full.items() if k != 'val_dataset'}
    path = write_cfg(tmp_path, 'no_val.yml', no_val)
    proc = run_cli('train.py', '--config', path, '--iters', 1, '--seed', 0, '--save_dir',
                   tmp_path / 'run')
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_command('train.py', '--config', path, '--iters', 1, '--do_eval', '--save_dir',
                       tmp_path / 'run2')
    assert_one_line_error(proc, '`val_dataset`', 'missing')
    proc = run_command('val.py', '--config', model_only, '--model_path', weights)
    assert_one_line_error(proc, '`val_dataset`', 'missing')


def test_mixed_loss_config_trains(instant_data, tmp_path):
    cfg = yaml.safe_load(open(INSTANT))
    cfg['_base_'] = QUICK
    mixed = {'type': 'MixedLoss', 'losses': [{'type': 'CrossEntropyLoss'},
                                             {'type': 'DiceLoss'}], 'coef': [0.8, 0.2]}
    cfg['loss'] = {'types': [mixed], 'coef': [1, 1, 1, 1, 1]}
    path = write_cfg(tmp_path, 'mixed.yml', cfg)
    proc = run_cli('train.py', '--config', path, '--iters', 2, '--log_iters', 1, '--seed', 0,
                   '--save_dir', tmp_path / 'o', '--opts', *data_opts(instant_data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # both inner losses contribute: a finite loss is logged each iteration, weights are saved
    losses = [float(v) for v in re.findall(r'iter: \d+/2, loss: ([0-9.]+)', proc.stdout)]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses), proc.stdout[-2000:]
    assert (tmp_path / 'o' / 'iter_2' / 'model.pdparams').is_file()


def test_nested_components_are_built_anywhere():
    from paddleseg.cvlibs import manager

    from segslim import builder
    from segslim._paddle import paddle

    class NestedHeadNet(paddle.nn.Layer):
        def __init__(self, num_classes, backbone, head, aux=()):
            super().__init__()
            self.backbone, self.head, self.aux = backbone, head, list(aux)

    if 'NestedHeadNet' not in manager.MODELS.components_dict:
        manager.MODELS.add_component(NestedHeadNet)
    model = builder.build_model({'model': {
        'type': 'NestedHeadNet', 'num_classes': 2,
        'backbone': {'type': 'STDC1'},
        'head': {'type': 'MixedLoss', 'coef': [1.0],
                 'losses': [{'type': 'CrossEntropyLoss'}]},
        'aux': [{'type': 'DiceLoss'}, 3]}})
    assert type(model.backbone).__name__ == 'STDCNet'
    assert type(model.head).__name__ == 'MixedLoss'
    assert type(model.head.losses[0]).__name__ == 'CrossEntropyLoss'
    assert type(model.aux[0]).__name__ == 'DiceLoss' and model.aux[1] == 3


def test_mixed_loss_inner_losses_get_ignore_index():
    from segslim import builder
    cfg = {'train_dataset': {'type': 'OpticDiscSeg', 'ignore_index': 7},
           'loss': {'types': [{'type': 'MixedLoss', 'coef': [1.0, 1.0], 'losses': [
               {'type': 'CrossEntropyLoss'}, {'type': 'DiceLoss'}]}], 'coef': [1]}}
    losses = builder.build_loss(cfg)
    inner = losses['types'][0].losses
    assert inner[0].ignore_index == 7 and inner[1].ignore_index == 7


def test_dice_loss_leaves_the_labels_to_the_other_terms():
    """PaddleSeg 2.8's DiceLoss writes 0 into the ignored pixels of its labels: every other
    term (the next output's loss here) must still see them as ignored."""
    from segslim._paddle import paddle
    from segslim.builder import build_loss
    from segslim.train.losses import compute_loss
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2, (2, 8, 8)).astype(np.int64)
    raw[:, :3] = 255
    labels = paddle.to_tensor(raw)
    logits = [paddle.to_tensor(rng.standard_normal((2, 2, 8, 8)).astype(np.float32),
                               stop_gradient=False) for _ in range(2)]
    mixed = {'type': 'MixedLoss', 'losses': [{'type': 'CrossEntropyLoss'},
                                             {'type': 'DiceLoss'}], 'coef': [0.8, 0.2]}
    losses = build_loss({'loss': {'types': [mixed, {'type': 'CrossEntropyLoss'}],
                                  'coef': [1, 1]},
                         'train_dataset': {'type': 'Dataset', 'ignore_index': 255}})
    terms = compute_loss(logits, labels, losses)
    assert len(terms) == 3
    np.testing.assert_array_equal(labels.numpy(), raw)
    alone = losses['types'][1](logits[1], paddle.to_tensor(raw))
    assert float(terms[2]) == pytest.approx(float(alone), rel=1e-6)
    sum(terms).backward()  # Paddle 3 refuses this when a saved label was overwritten
    assert np.isfinite(logits[0].grad.numpy()).all()
