"""OpenVINO's own post-training quantizer, NNCF, as a PTQ method (ptq.py --quantizer nncf):
the FP32 export as OpenVINO reads it, FakeQuantize ops placed where OpenVINO's CPU plugin
runs INT8, calibrated on the same train images as PaddleSlim's PTQ; written as an OpenVINO
IR folder (model.xml/model.bin + deploy.yaml) that only the OpenVINO engine runs.

With a mIoU bound, NNCF's accuracy-controlled variant reverts the quantized ops that cost
the most on the val images, one at a time, until the OpenVINO model is within the bound."""
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from segslim.data.datasets import SegDataset, read_label
from segslim.deploy.cpu import cpu_features
from segslim.deploy.engine import output_labels, restore_size
from segslim.deploy.openvino_engine import import_openvino
from segslim.deploy.openvino_graph import multiplies_activations
from segslim.errors import UserError, require
from segslim.logger import logger
from segslim.modeldir import (
    Deploy,
    Preprocessor,
    model_inputs,
    quantized_deploy,
    read_deploy,
    staged_model_folder,
    write_deploy,
)
from segslim.options import MAX_REVERTED
from segslim.train.metrics import ConfusionMatrix

IR_FILES = ('model.xml', 'model.bin')


def import_nncf() -> Any:
    return require('nncf', '--quantizer nncf', 'openvino', '--quantizer paddleslim')


class ValImages:
    """The first `limit` val images as the deployed model sees them, with their labels and
    the transforms' records; miou(compiled) scores an OpenVINO compiled model on them."""

    def __init__(self, deploy: Deploy, dataset: SegDataset, limit: Optional[int]):
        pre = Preprocessor(deploy['transforms'])
        self.num_classes, self.ignore = dataset.num_classes, dataset.ignore_index
        self.items: List[Tuple[np.ndarray, list, np.ndarray]] = []
        for img_path, label_path in dataset.file_list[:limit]:
            if label_path is None:
                raise UserError(f'val image {img_path} has no label; list a label for it')
            img, info = pre(img_path)
            self.items.append((np.ascontiguousarray(img[np.newaxis], np.float32), info,
                               read_label(label_path)))

    def miou(self, compiled: Any, items: Any = None) -> float:
        cm = ConfusionMatrix(self.num_classes, self.ignore)
        for image, info, truth in (self.items if items is None else items):
            labels = output_labels(compiled(image)[compiled.outputs[0]])[0]
            cm.update(restore_size(labels, info), truth)
        return float(cm.compute()['miou'])


def nncf_model_type(nncf: Any, model: Any) -> Any:
    """The model_type NNCF's documentation asks for: ModelType.TRANSFORMER for a transformer
    (a model whose MatMuls multiply activations, SegFormer's attention), else None (its
    default). On an early SegFormer-B0 of the street benchmark the default's INT8 labels
    agreed with FP32 on half the pixels, TRANSFORMER's on three quarters."""
    return nncf.ModelType.TRANSFORMER if multiplies_activations(model) else None


def nncf_quantize(fp32_dir: str, save_dir: str, image_paths: Sequence[str],
                  val_dataset: Optional[SegDataset] = None, num_images: Optional[int] = None,
                  max_drop: Optional[float] = None,
                  max_reverted: int = MAX_REVERTED) -> None:
    """Quantizes the FP32 export in `fp32_dir` with NNCF into an OpenVINO IR folder
    `save_dir`; with `max_drop` the accuracy-controlled variant, checked on the first
    `num_images` images of `val_dataset`. Returns {'save_dir', 'images'}."""
    deploy = read_deploy(fp32_dir)
    if deploy.get('quantized'):
        raise UserError(f'{fp32_dir} is already quantized; pass an FP32 export')
    ov = import_openvino()
    nncf = import_nncf()
    model = ov.Core().read_model(deploy['model'], deploy['params'])
    calibration = nncf.Dataset(model_inputs(deploy, image_paths))
    # Without VNNI, OpenVINO's INT8 kernels saturate on 8-bit weights: NNCF quantizes them
    # to 7 bits (what the OpenVINO engine does to other exports there), so the accuracy
    # control below sees what runs.
    overflow_fix = nncf.OverflowFix.FIRST_LAYER if cpu_features()['vnni'] else \
        nncf.OverflowFix.ENABLE
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=overflow_fix)
    model_type = nncf_model_type(nncf, model)
    if max_drop is None:
        quantized = nncf.quantize(model, calibration, subset_size=len(image_paths),
                                  model_type=model_type, advanced_parameters=advanced)
    else:
        val = ValImages(deploy, val_dataset, num_images) if val_dataset is not None else None
        if val is None or not val.items:
            raise UserError('--max_miou_drop with --quantizer nncf needs val images: give the '
                            'config a val_dataset')
        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(val.items), validation_fn=val.miou,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, model_type=model_type,
            subset_size=len(image_paths), advanced_quantization_parameters=advanced,
            advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
                max_num_iterations=max_reverted))
        core, props = ov.Core(), {'INFERENCE_PRECISION_HINT': 'f32'}
        fp32, int8 = (val.miou(core.compile_model(m, 'CPU', props)) for m in (model, quantized))
        (logger.info if fp32 - int8 <= max_drop else logger.warning)(
            'NNCF accuracy control: OpenVINO INT8 mIoU %.4f vs FP32 %.4f on %d val images '
            '(bound %.4f: %s)', int8, fp32, len(val.items), max_drop,
            'met' if fp32 - int8 <= max_drop else f'NOT met within {max_reverted} reverted '
            'ops; raise --max_reverted')
    with staged_model_folder(save_dir) as stage:
        ov.save_model(quantized, os.path.join(stage, IR_FILES[0]), compress_to_fp16=False)
        write_deploy(stage, quantized_deploy(
            deploy, IR_FILES[0], IR_FILES[1], engine='openvino',
            calibration={'method': 'nncf', 'images': len(image_paths),
                         'overflow_fix': overflow_fix.value,
                         **({'model_type': model_type.value} if model_type else {}),
                         **({'max_miou_drop': max_drop} if max_drop else {})}))
    logger.info('PTQ (NNCF%s, %d calibration images) wrote the OpenVINO INT8 model to %s',
                ', accuracy-controlled' if max_drop else '', len(image_paths), save_dir)
