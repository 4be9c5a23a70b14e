"""Post-training quantization: PaddleSlim's quant_post_static on an exported FP32 inference
model, calibrated on train images through the deploy transforms, with the QAT skip policy,
saved in qat_export's layout (model.pdmodel, model.pdiparams, deploy.yaml)."""
import os
import shutil
import time
from typing import Any, List, Optional, Sequence

import numpy as np

from segslim._paddle import paddle
from segslim.config import Yaml
from segslim.errors import UserError
from segslim.logger import logger, progress_bar, quiet_native_output
from segslim.modeldir import (
    Preprocessor,
    quantized_deploy,
    read_deploy,
    staged_model_folder,
    write_deploy,
)
from segslim.options import CALIBRATION_IMAGES, NEAREST, PTQ_ALGOS, Rounding
from segslim.program import (
    LAYER_OPS,
    fold_conv_bias_reshape,
    program_input_names,
    read_program,
)
from segslim.quant.calibration import paddle_calibration
from segslim.quant.qat import log_quant_summary, quant_plan
from segslim.quant.rounding import learned_rounding

# Below CALIBRATION_IMAGES images the activation scales (a max, a mean of maxima, a histogram
# percentile or a KL threshold over what was seen) follow a few images' extremes: a class or
# lighting missing from them gets its activations clipped on other images.


class CalibrationImages(paddle.io.Dataset):
    """Image files through the deploy transforms: CHW float32 arrays. `bar` (a progress bar)
    advances with every image read."""

    def __init__(self, paths: Sequence[str], transforms: List[Yaml],
                 bar: Any = None):
        super().__init__()
        self.paths = list(paths)
        self.pre = Preprocessor(transforms)
        self.bar = bar

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.bar is not None:
            self.bar.update(1)
        return self.pre(self.paths[i])[0]


def calibration_paths(file_list: Sequence[Any], count: int, seed: int = 0) -> List[str]:
    """`count` image paths drawn without replacement (seeded) from a dataset's file list, so
    calibration sees the whole set rather than its first images."""
    order = np.random.default_rng(seed).permutation(len(file_list))
    return [file_list[i][0] for i in order[:count]]


def warn_if_too_few(images: int, asked: int, available: int) -> None:
    if asked > available:
        logger.warning('PTQ: --batch_nums x --batch_size asks for %d calibration images but the '
                       'train set has %d; calibrating on all of them', asked, available)
    if images < CALIBRATION_IMAGES:
        logger.warning('PTQ: %d calibration images is too few to trust (under %d): activation '
                       'scales are statistics of the images seen, so they follow those images\' '
                       'extremes and may clip activations on others; raise --batch_nums (and '
                       'check the INT8 mIoU on val)', images, CALIBRATION_IMAGES)


def skipped_weights(model: paddle.nn.Layer, qcfg: Yaml, what: str,
                    summary: bool = True, summary_dir: Optional[str] = None) -> List[str]:
    """Weight names of the layers the QAT policy skips (PTQ's skip_tensor_list), after logging
    the quant summary (its table in `summary_dir`). `model` must be the one the program was
    exported from (same names)."""
    plan = quant_plan(model, qcfg)
    if not any(rule == 'quantized' for _, _, rule in plan):
        raise UserError('config key `quant_config`: no layer is left to quantize (layers: {}, '
                        'skip: {}); loosen the policy'.format(qcfg['layers'], qcfg['skip']))
    if summary:
        log_quant_summary(plan, what, summary_dir)
    layers = dict(model.named_sublayers())
    return [layers[name].weight.name for name, _, rule in plan if rule != 'quantized']


def check_names_in_program(names: Sequence[str], model_file: str) -> None:
    """The skipped layers' weights must be variables of the program, or the skip list would
    silently not apply."""
    desc = read_program(model_file)
    block = desc.block(0)
    missing = [n for n in names if block.find_var(n.encode()) is None]
    if missing:
        raise UserError(f'{model_file} does not hold the weights of the skipped layers (e.g. '
                        f'{missing[0]}): it was '
                        'not exported from this config\'s model; pass --model_path with the '
                        'FP32 weights instead of --model_dir')


def check_quantizer_flags(quantizer: str, to_onnx: bool, max_miou_drop: Optional[float],
                          rounding: Rounding = NEAREST) -> None:
    """Refuses ptq.py flags the chosen quantizer would ignore."""
    if quantizer == 'nncf' and rounding != NEAREST:
        raise UserError('--round_type, --bias_correction and --recon are PaddleSlim\'s: drop '
                        'them or use --quantizer paddleslim')
    if quantizer == 'nncf' and to_onnx:
        raise UserError('--quantizer nncf writes an OpenVINO IR model, not ONNX; drop '
                        '--to_onnx/--onnx_target or use --quantizer paddleslim')
    if quantizer != 'nncf' and max_miou_drop is not None:
        raise UserError('--max_miou_drop in ptq.py is NNCF\'s accuracy control: add --quantizer '
                        'nncf, or find a skip set with slim/quant/analysis.py --max_miou_drop')


def post_training_quantize(fp32_dir: str, save_dir: str, image_paths: Sequence[str],
                           qcfg: Yaml, skip_weights: Sequence[str], algo: str = 'abs_max',
                           batch_size: int = 1, device: str = 'cpu',
                           rounding: Rounding = NEAREST) -> None:
    """Quantizes the exported FP32 model in `fp32_dir` into `save_dir` (files staged, then
    each moved into place), rounding the weights as `rounding` says; returns {'save_dir',
    'images', 'algo', 'rounding', 'seconds'}."""
    if algo not in PTQ_ALGOS:
        raise UserError('--algo {} is not one of {}'.format(algo, ', '.join(PTQ_ALGOS)))
    rounding.check()
    started = time.time()
    deploy = read_deploy(fp32_dir)
    if deploy.get('quantized'):
        raise UserError(f'{fp32_dir} is already quantized; pass an FP32 export')
    check_names_in_program(skip_weights, deploy['model'])
    feed = (program_input_names(deploy['model']) or ['x'])[0]
    op_types = sorted({op for kind in qcfg['quantizable_layer_type'] for op in LAYER_OPS[kind]})
    with staged_model_folder(save_dir) as stage:
        src = os.path.join(stage, 'fp32')
        os.makedirs(src)
        shutil.copyfile(deploy['model'], os.path.join(src, 'model.pdmodel'))
        shutil.copyfile(deploy['params'], os.path.join(src, 'model.pdiparams'))
        fold_conv_bias_reshape(os.path.join(src, 'model.pdmodel'))  # upstream exports
        # PaddleSlim's own output is silenced, so the bar draws on a copy of stderr; the
        # histogram methods read the images twice.
        passes = 2 if algo in ('KL', 'hist') else 1
        bar = progress_bar(len(image_paths) * passes, f'PTQ calibration ({algo})')
        dataset = CalibrationImages(image_paths, deploy['transforms'], bar)

        def collate(batch):
            if len({img.shape for img in batch}) > 1:
                raise UserError('calibration images differ in size after the deploy '
                                'transforms; use --batch_size 1 or add a Resize to them')
            return {feed: np.stack(batch).astype(np.float32)}
        place = paddle.CUDAPlace(0) if device == 'gpu' else paddle.CPUPlace()
        paddle.enable_static()
        try:
            loader = paddle.io.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                          drop_last=False, collate_fn=collate, num_workers=0)
            weight_type = 'channel_wise_abs_max' \
                if qcfg['weight_quantize_type'] == 'channel_wise_abs_max' else 'abs_max'
            common = dict(
                executor=paddle.static.Executor(place), model_dir=src,
                quantize_model_path=stage, data_loader=loader, model_filename='model.pdmodel',
                params_filename='model.pdiparams', save_model_filename='model.pdmodel',
                save_params_filename='model.pdiparams', batch_size=batch_size,
                batch_nums=-(-len(dataset) // batch_size), algo=algo,
                quantizable_op_type=op_types, weight_bits=qcfg['weight_bits'],
                activation_bits=qcfg['activation_bits'], weight_quantize_type=weight_type,
                onnx_format=True, skip_tensor_list=list(skip_weights) or None,
                bias_correction=rounding.bias_correction)
            # PaddleSlim's progress bars and per-step logs
            with quiet_native_output(), paddle_calibration():
                if rounding.learned:
                    learned_rounding(common, rounding)
                else:
                    from paddleslim.quant import quant_post_static
                    quant_post_static(**common)
        finally:
            paddle.disable_static()
            if bar is not None:
                bar.close()
        write_deploy(stage, quantized_deploy(
            deploy, 'model.pdmodel', 'model.pdiparams', int8_ops=list(qcfg['int8_ops']),
            calibration={'method': 'ptq', 'algo': algo, 'images': len(dataset),
                         'rounding': rounding.name}))
        shutil.rmtree(src)
    seconds = round(time.time() - started, 1)
    logger.info('PTQ (%s, %s rounding, %d calibration images, %.1f s) wrote the INT8 inference '
                'model to %s', algo, rounding.name, len(dataset), seconds, save_dir)

