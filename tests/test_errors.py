"""Every mistake a user can make ends with exit != 0, one `error:` line naming the file or
key, no traceback, and nothing half-written (the numbered cases of the reliability issue)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import yaml
from conftest import INSTANT, ROOT, assert_one_line_error, data_opts, run_cli, run_command
from PIL import Image

QUICK = os.path.join(ROOT, 'configs', 'quick_start', 'bisenet_optic_disc_512x512_1k.yml')


def write_cfg(path, **changes):
    cfg = yaml.safe_load(open(INSTANT))
    cfg['_base_'] = QUICK
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def copy_data(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def train(save_dir, *args, cfg=INSTANT, data=None, iters=2, process=False):
    """train.py in this process (setup errors), or in its own with `process` (a run that
    trains: parameter names, which the optimizer state is keyed by, are per process)."""
    opts = data_opts(data) if data else []
    run = run_cli if process else run_command
    return run('train.py', '--config', cfg, '--iters', iters, '--save_dir', save_dir, *args,
               *(['--opts'] + opts if opts else []))


def no_checkpoint(save_dir):
    return not os.path.exists(save_dir) or not any(
        n.startswith(('iter_', 'best_model')) for n in os.listdir(save_dir))


# 1-6, 19: config and flags ---------------------------------------------------------------
def test_01_config_missing(tmp_path):
    proc = train(tmp_path / 'out', cfg=tmp_path / 'nope.yml')
    assert_one_line_error(proc, 'nope.yml', 'does not exist', code=2)
    assert not (tmp_path / 'out').exists()


def test_02_yaml_syntax_error_with_line(tmp_path):
    bad = tmp_path / 'bad.yml'
    bad.write_text('batch_size: 2\nmodel:\n  type: [BiSeNetV2\n')
    assert_one_line_error(train(tmp_path / 'out', cfg=bad), 'bad.yml line', 'YAML syntax')


@pytest.mark.parametrize('key', ['model', 'train_dataset', 'loss'])
def test_03_required_key_missing(tmp_path, key):
    cfg = yaml.safe_load(open(QUICK))
    del cfg[key]
    path = tmp_path / 'cfg.yml'
    path.write_text(yaml.safe_dump(cfg))
    assert_one_line_error(train(tmp_path / 'out', cfg=path), f'`{key}`', 'missing')


@pytest.mark.parametrize('opt,words', [
    ('model.type=BiSeNetV3', ['model.type', 'BiSeNetV2']),
    ('loss.types=[{"type": "CrossEntropyLos"}]', ['loss.types[0].type', 'CrossEntropyLoss']),
    ('train_dataset.transforms=[{"type": "Resise"}]', ['transforms[0].type', 'Resize']),
])
def test_04_unknown_type_suggests_closest(tmp_path, instant_data, opt, words):
    proc = run_command('train.py', '--config', INSTANT, '--save_dir', tmp_path / 'out', '--opts',
                       *data_opts(instant_data), opt)
    assert_one_line_error(proc, 'unknown', *words)
    assert no_checkpoint(tmp_path / 'out')


def test_05_base_missing_or_cyclic(tmp_path):
    (tmp_path / 'a.yml').write_text('_base_: b.yml\n')
    (tmp_path / 'b.yml').write_text('_base_: a.yml\n')
    assert_one_line_error(train(tmp_path / 'o', cfg=tmp_path / 'a.yml'), 'cyclic')
    (tmp_path / 'c.yml').write_text('_base_: gone.yml\n')
    assert_one_line_error(train(tmp_path / 'o', cfg=tmp_path / 'c.yml'), 'gone.yml')


@pytest.mark.parametrize('opt,word', [('iters', 'key.sub=value'),
                                      ('nonsense.key=1', "unknown key 'nonsense'"),
                                      ('model.backbone.x=1', 'does not exist')])
def test_06_bad_opts(tmp_path, opt, word):
    proc = run_command('train.py', '--config', INSTANT, '--save_dir', tmp_path, '--opts', opt)
    assert_one_line_error(proc, word)


@pytest.mark.parametrize('flag,value', [('--iters', 0), ('--batch_size', -1),
                                        ('--learning_rate', 0)])
def test_19_nonpositive_numbers(tmp_path, flag, value):
    proc = run_command('train.py', '--config', INSTANT, '--save_dir', tmp_path / 'o', flag, value)
    assert_one_line_error(proc, flag, 'positive')


# 7-10: weights ------------------------------------------------------------------------
def test_07_model_path_missing(tmp_path, instant_data):
    proc = run_command('val.py', '--config', INSTANT, '--model_path', tmp_path / 'x.pdparams',
                       '--opts', *data_opts(instant_data))
    assert_one_line_error(proc, '--model_path', 'x.pdparams', 'does not exist')


@pytest.mark.parametrize('kind', ['text', 'truncated'])
def test_08_model_path_not_params(tmp_path, fp32_run, kind):
    bad = tmp_path / 'model.pdparams'
    if kind == 'text':
        bad.write_text('this is not a checkpoint\n')
    else:
        data = open(os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'), 'rb').read()
        bad.write_bytes(data[:len(data) // 3])
    proc = run_command('val.py', '--config', INSTANT, '--model_path', bad,
                       '--opts', *data_opts(fp32_run['data']))
    assert_one_line_error(proc, str(bad), 'not a Paddle params file')


def test_09_weights_of_other_model(tmp_path, fp32_run):
    proc = run_command('export.py', '--config', INSTANT, '--model_path',
                       os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                       '--save_dir', tmp_path / 'out', '--opts', 'model.num_classes=3')
    line = assert_one_line_error(proc, 'does not fit', 'mismatched', '[2')
    assert 'num_classes' in line and not (tmp_path / 'out' / 'model.pdmodel').exists()
    # BiSeNetV2 weights into a PP-LiteSeg that builds: the refusal comes from loading
    proc = run_command('slim/quant/qat_train.py', '--config', os.path.join(
        ROOT, 'configs', 'quick_start', 'pp_liteseg_optic_disc_512x512_1k.yml'),
        '--model_path', os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
        '--save_dir', tmp_path / 'q', '--opts', 'model.backbone.pretrained=None',
        *data_opts(fp32_run['data']))
    line = assert_one_line_error(proc, 'does not fit the model of --config', 'missing')
    assert 'model.pdparams' in line and not (tmp_path / 'q' / 'iter_1').exists()


@pytest.mark.parametrize('script', ['slim/quant/qat_val.py', 'slim/quant/qat_export.py'])
def test_10_fp32_weights_to_qat_scripts(tmp_path, fp32_run, script):
    args = ['--save_dir', tmp_path / 'out'] if 'export' in script else []
    proc = run_command(script, '--config', INSTANT, '--model_path',
                       os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'), *args,
                       '--opts', *data_opts(fp32_run['data']))
    assert_one_line_error(proc, 'FP32 weights', 'qat_train.py')


# 11-16: data ---------------------------------------------------------------------------
def test_11_dataset_root_missing_offline_never_hangs(tmp_path):
    # SEGSLIM_OFFLINE (set for every test) answers the reachability probe without sending
    # anything: tests never contact outside hosts.
    tic = time.time()
    proc = run_command('train.py', '--config', INSTANT, '--save_dir', tmp_path / 'o', '--opts',
                       *data_opts(str(tmp_path / 'absent')))
    assert time.time() - tic < 60
    assert_one_line_error(proc, 'dataset_root', 'absent', 'make_demo_dataset.py')
    assert no_checkpoint(tmp_path / 'o')


@pytest.mark.parametrize('what', ['image', 'label'])
def test_12_list_names_missing_file(tmp_path, instant_data, what):
    root = copy_data(instant_data, tmp_path / 'd')
    line = open(os.path.join(root, 'train_list.txt')).readline().split()
    os.remove(os.path.join(root, line[0 if what == 'image' else 1]))
    proc = train(tmp_path / 'o', data=root)
    assert_one_line_error(proc, line[0 if what == 'image' else 1], 'does not exist')


def first_pair(root, split='train'):
    img, lab = open(os.path.join(root, split + '_list.txt')).readline().split()
    return os.path.join(root, img), os.path.join(root, lab)


def test_13_label_size_differs(tmp_path, instant_data):
    root = copy_data(instant_data, tmp_path / 'd')
    _, lab = first_pair(root, 'val')
    Image.open(lab).resize((32, 32)).save(lab)
    proc = train(tmp_path / 'o', '--do_eval', data=root)
    assert_one_line_error(proc, os.path.basename(lab), '32x32', 'must match')


@pytest.mark.parametrize('workers', [0, 2])
def test_14_label_values_out_of_range(tmp_path, instant_data, workers):
    root = copy_data(instant_data, tmp_path / 'd')
    for line in open(os.path.join(root, 'train_list.txt')):
        lab = os.path.join(root, line.split()[1])
        arr = np.asarray(Image.open(lab)).copy()
        arr[0, 0] = 7
        Image.fromarray(arr).save(lab)
    # worker processes are forked: in their own process, not this one (its threads, e.g. a
    # pytest-xdist worker's, can leave a forked child waiting on a lock forever)
    proc = train(tmp_path / 'o', '--num_workers', workers, data=root, process=workers > 0)
    assert_one_line_error(proc, 'class ids [7]', 'outside [0, 2)')
    assert no_checkpoint(tmp_path / 'o')


def test_15_grayscale_rgba_16bit_images_are_converted(tmp_path, instant_data):
    root = copy_data(instant_data, tmp_path / 'd')
    lines = open(os.path.join(root, 'train_list.txt')).read().split('\n')
    converted = []
    for i, mode in enumerate(['gray', 'rgba', 'u16']):
        img_rel, lab_rel = lines[i].split()
        src = cv2.imread(os.path.join(root, img_rel))
        new_rel = img_rel.replace('.jpg', f'_{mode}.png')
        if mode == 'gray':
            out = cv2.cvtColor(src, cv2.COLOR_BGR2GRAY)
        elif mode == 'rgba':
            out = cv2.cvtColor(src, cv2.COLOR_BGR2BGRA)
        else:
            out = src.astype(np.uint16) * 257
        cv2.imwrite(os.path.join(root, new_rel), out)
        converted.append(f'{new_rel} {lab_rel}')
    open(os.path.join(root, 'train_list.txt'), 'w').write('\n'.join(converted) + '\n')
    # the list holds only the three converted images and a batch takes all three
    proc = train(tmp_path / 'o', '--batch_size', 3, data=root, iters=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from segslim.data.datasets import read_image
    src = cv2.imread(os.path.join(root, lines[0].split()[0])).astype(np.float32)
    gray = read_image(os.path.join(root, converted[0].split()[0]))
    assert gray.shape == src.shape and (gray[..., 0] == gray[..., 2]).all()
    rgba = read_image(os.path.join(root, converted[1].split()[0]))
    u16 = read_image(os.path.join(root, converted[2].split()[0]))
    src1 = cv2.imread(os.path.join(root, lines[1].split()[0])).astype(np.float32)
    src2 = cv2.imread(os.path.join(root, lines[2].split()[0])).astype(np.float32)
    assert (rgba == src1).all() and (u16 == src2).all()


@pytest.mark.parametrize('split', ['train', 'val'])
def test_16_empty_list(tmp_path, instant_data, split):
    root = copy_data(instant_data, tmp_path / 'd')
    open(os.path.join(root, split + '_list.txt'), 'w').close()
    proc = train(tmp_path / 'o', '--do_eval', data=root)
    assert_one_line_error(proc, f'{split}_dataset', 'empty')


# 17, 18, 20: output and checkpoints ------------------------------------------------------
def test_17_save_dir_not_writable(tmp_path, instant_data):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    proc = train(blocker / 'sub', data=instant_data)
    assert_one_line_error(proc, '--save_dir', 'not writable')
    proc = train(blocker, data=instant_data)
    assert_one_line_error(proc, '--save_dir', 'is a file')
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / 'ro'
        ro.mkdir()
        ro.chmod(0o500)
        assert_one_line_error(train(ro / 'x', data=instant_data), 'not writable')


def test_18_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC is simulated in-process: paddle.save fails half-way through a checkpoint."""
    import errno

    from segslim._paddle import paddle
    from segslim.errors import UserError
    from segslim.train import checkpoint as ckpt
    layer = paddle.nn.Linear(2, 2)
    target = str(tmp_path / 'best_model')
    ckpt.save_checkpoint(target, layer)
    before = open(os.path.join(target, 'model.pdparams'), 'rb').read()
    real_save = paddle.save

    def full_disk(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        with open(path, 'ab') as f:
            f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(paddle, 'save', full_disk)
    with paddle.no_grad():
        layer.weight.set_value(layer.weight * 0 + 5)
    with pytest.raises(UserError, match='disk full'):
        ckpt.save_checkpoint(target, layer)
    assert open(os.path.join(target, 'model.pdparams'), 'rb').read() == before
    assert os.listdir(str(tmp_path)) == ['best_model']


@pytest.mark.parametrize('damage', ['no_state', 'corrupt_state', 'not_a_folder',
                                    'corrupt_params'])
def test_20_bad_resume_checkpoint(tmp_path, fp32_run, damage):
    ck = tmp_path / 'iter_10'
    shutil.copytree(os.path.join(fp32_run['dir'], 'iter_10'), ck)
    if damage == 'no_state':
        os.remove(ck / 'train_state.json')
    elif damage == 'corrupt_state':
        (ck / 'train_state.json').write_bytes(b'\x80\x04garbage')
    elif damage == 'corrupt_params':
        (ck / 'model.pdparams').write_bytes(b'garbage')
    else:
        ck = ck / 'model.pdparams'
    proc = train(tmp_path / 'o', '--resume_model', ck, data=fp32_run['data'], iters=20)
    assert_one_line_error(proc, '--resume_model', str(ck))
    assert no_checkpoint(tmp_path / 'o')


# 21-23: deploy --------------------------------------------------------------------------
def test_21_infer_bad_inputs(tmp_path, exported):
    deploy = os.path.join(exported['int8'], 'deploy.yaml')
    proc = run_command('deploy/python/infer.py', '--config', deploy, '--image_path',
                       tmp_path / 'none.jpg')
    assert_one_line_error(proc, 'none.jpg', 'does not exist')
    junk = tmp_path / 'junk.jpg'
    junk.write_text('not an image')
    proc = run_command('deploy/python/infer.py', '--config', deploy, '--image_path', junk,
                       '--save_dir', tmp_path / 'o')
    assert_one_line_error(proc, 'junk.jpg', 'cannot be decoded')
    proc = run_command('deploy/python/infer.py', '--config', tmp_path, '--image_path', junk)
    assert_one_line_error(proc, 'deploy.yaml')


def test_22_benchmark_on_non_inference_folder(tmp_path, fp32_run):
    proc = run_command('deploy/python/benchmark.py', '--model_dirs',
                       os.path.join(fp32_run['dir'], 'best_model'), '--repeats', 1)
    assert_one_line_error(proc, 'deploy.yaml', 'export.py')
    fake = tmp_path / 'fake'
    fake.mkdir()
    (fake / 'deploy.yaml').write_text(yaml.safe_dump(
        {'Deploy': {'model': 'model.pdmodel', 'params': 'model.pdiparams'}}))
    (fake / 'model.pdmodel').write_text('junk')
    (fake / 'model.pdiparams').write_text('junk')
    proc = run_command('deploy/python/benchmark.py', '--model_dirs', fake, '--repeats', 1)
    assert_one_line_error(proc, 'model.pdmodel', 'not a Paddle inference program')


def test_23_qat_export_over_another_model(tmp_path, exported, qat_run):
    target = tmp_path / 'target'
    shutil.copytree(exported['fp32'], target)
    (target / 'notes.txt').write_text('mine')
    proc = run_command('slim/quant/qat_export.py', '--config', INSTANT, '--model_path',
                       os.path.join(qat_run['dir'], 'best_model', 'model.pdparams'),
                       '--save_dir', target, '--verify_images', 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (target / 'notes.txt').read_text() == 'mine'
    assert yaml.safe_load(open(target / 'deploy.yaml'))['Deploy']['quantized'] is True
    assert not [n for n in os.listdir(target) if n.startswith('.export-')]


# 24, 25: device and flags -----------------------------------------------------------------
@pytest.mark.skipif(__import__('segslim._paddle', fromlist=['paddle']).paddle
                    .is_compiled_with_cuda(), reason='needs a CPU-only paddle build')
def test_24_gpu_on_cpu_build_falls_back(fp32_run):
    proc = run_command('val.py', '--config', INSTANT, '--device', 'gpu', '--model_path',
                       os.path.join(fp32_run['dir'], 'best_model', 'model.pdparams'),
                       '--opts', *data_opts(fp32_run['data']))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'no CUDA' in proc.stdout and 'running on CPU' in proc.stdout


def test_25_unknown_flag():
    proc = run_command('train.py', '--config', INSTANT, '--no_such_flag')
    assert proc.returncode == 2 and 'unrecognized arguments: --no_such_flag' in proc.stderr


# NaN loss and Ctrl-C ---------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, fp32_run):
    run = tmp_path / 'run'
    shutil.copytree(os.path.join(fp32_run['dir'], 'iter_10'), run / 'iter_10')
    before = open(run / 'iter_10' / 'model.pdparams', 'rb').read()
    proc = train(run, '--resume_model', run / 'iter_10', '--save_interval', 1,
                 '--opts', *data_opts(fp32_run['data']), 'loss.coef=[1e39, 1e39, 1e39, 1e39, 1e39]',
                 iters=20, process=True)
    assert_one_line_error(proc, 'loss became', 'at iter 11', 'iter_10')
    assert open(run / 'iter_10' / 'model.pdparams', 'rb').read() == before
    assert sorted(os.listdir(run)) == ['config.yaml', 'iter_10']


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_resume_hint(tmp_path, instant_data):
    out = tmp_path / 'run'
    child = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train.py'), '--config', INSTANT, '--iters', '400',
         '--save_interval', '2', '--save_dir', str(out), '--opts'] + data_opts(instant_data),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, SEGSLIM_OFFLINE='1'),
        # a suite started in the background (`&`, nohup: a CI runner's way) ignores SIGINT,
        # children inherit that and Python then installs no Ctrl-C handler: give the child
        # the default a terminal gives
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / 'iter_4').exists() and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr[-2000:]
    assert 'Traceback' not in stderr and 'interrupted' in stderr
    assert 'Resume with --resume_model' in stdout
    assert (out / 'iter_4' / 'train_state.json').exists()


# Every script, each bad path or value flag: exit 2 and one line within seconds, before any
# work, and nothing new in --save_dir.
BAD_FLAGS = [
    ('slim/quant/ptq.py', ['--model_dir', '{empty}'], ['deploy.yaml']),
    ('slim/quant/ptq.py', ['--model_path', '{missing}'], ['nope.pdparams']),
    ('slim/quant/ptq.py', ['--quantizer', 'nncf', '--max_miou_drop', '5'], ['--max_miou_drop']),
    ('slim/quant/analysis.py', ['--max_miou_drop', '5'], ['--max_miou_drop', 'between 0 and 1']),
    ('slim/quant/analysis.py', ['--max_miou_drop', '0'], ['--max_miou_drop']),
    ('slim/quant/analysis.py', ['--model_path', '{missing}'], ['nope.pdparams']),
    ('slim/quant/auto_quant.py', ['--model_path', '{missing}', '--max_miou_drop', '-1'],
     ['--max_miou_drop']),
    ('slim/quant/qat_train.py', ['--model_path', '{missing}'], ['nope.pdparams']),
    ('train.py', ['--cpu_threads', '0'], ['--cpu_threads', 'positive']),
    ('slim/quant/qat_export.py', ['--model_path', '{missing}'], ['nope.pdparams']),
    ('deploy/python/benchmark.py', ['--model_dirs', '{empty}'], ['deploy.yaml']),
]


@pytest.mark.parametrize('script,flags,words', BAD_FLAGS,
                         ids=[f'{s.split("/")[-1]}{"".join(f[:1])}{i}'
                              for i, (s, f, _) in enumerate(BAD_FLAGS)])
def test_bad_flag_refused_before_any_work(instant_data, tmp_path, script, flags, words):
    empty = tmp_path / 'empty'
    empty.mkdir()
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'kept.txt').write_text('a user file')
    names = {'{empty}': str(empty), '{missing}': str(tmp_path / 'nope.pdparams')}
    argv = [names.get(f, f) for f in flags]
    if script == 'slim/quant/auto_quant.py':
        argv = argv[:2] + ['--max_miou_drop', argv[3]]
    save = ['--save_dir', str(out)] if 'benchmark' not in script else ['--json',
                                                                       str(out / 'r.json')]
    started = time.time()
    proc = run_command(script, '--config', INSTANT, *save, *argv, '--opts',
                       *data_opts(instant_data))
    assert_one_line_error(proc, *words)
    assert time.time() - started < 30
    assert sorted(os.listdir(out)) == ['kept.txt'] and os.listdir(empty) == []
