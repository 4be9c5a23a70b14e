"""FP32 vs INT8 on the deployed engine: mIoU with the training metric code, latency
(interleaved, median and p90), pixel agreement, and which convs really run INT8. Every loop
over a dataset goes image by image: memory does not grow with the val set."""
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from segslim.compat import ENGINE_STACK, package_versions
from segslim.data.datasets import SegDataset, read_label
from segslim.deploy.bench_report import BenchReport
from segslim.deploy.cpu import cpu_features
from segslim.deploy.engine import EngineBase, restore_size
from segslim.deploy.engines import BACKENDS, create_predictor, runs_model
from segslim.deploy.paddle_engine import check_engine_options
from segslim.deploy.report import GalleryPick
from segslim.deploy.results import Accuracy, BenchRow, Precision, row_ratio, within_bound
from segslim.errors import UserError
from segslim.logger import logger, progress
from segslim.modeldir import Preprocessor, resize_chw
from segslim.options import TIMING_SHAPE, EngineOptions
from segslim.train.metrics import ConfusionMatrix


def evaluate_engines(predictors: Sequence[EngineBase], dataset: SegDataset,
                     limit: Optional[int] = None, model: Any = None,
                     gallery: Optional[GalleryPick] = None,
                     desc: str = 'Evaluating') -> List[Accuracy]:
    """Runs every predictor on the first `limit` val images, one image at a time; per
    predictor its Accuracy: pixel agreement with the first predictor and, with `model` (a
    dygraph model, e.g. the QAT model with its fake-quant ops), `model_agreement`. Label
    maps go back to the label size by one rule (restore_size), so a Resize in the deploy
    transforms does not bias a count. `gallery` is offered each image's labels of its two
    rows."""
    files = dataset.file_list[:limit]
    cms = [ConfusionMatrix(dataset.num_classes, dataset.ignore_index) for _ in predictors]
    same = np.zeros(len(predictors), np.int64)
    same_model = np.zeros(len(predictors), np.int64)
    pixels = 0
    shared: Dict[str, Preprocessor] = {}  # one per distinct deploy transforms
    for p in predictors:
        key = repr(p.deploy['transforms'])
        if key not in shared:
            shared[key] = Preprocessor(p.deploy['transforms'])
    pres = [shared[repr(p.deploy['transforms'])] for p in predictors]
    if model is not None:
        model.eval()
    for i in progress(range(len(files)), desc):
        img_path, label_path = files[i]
        labels = []
        for pred, pre in zip(predictors, pres):
            img, info = pre(img_path)
            labels.append(restore_size(pred.labels(img[np.newaxis])[0], info))
        if label_path is None:
            raise UserError(f'val image {img_path} has no label; list a label for it')
        truth = read_label(label_path)
        for cm, lab in zip(cms, labels):
            cm.update(lab, truth)
        same += [int((lab == labels[0]).sum()) for lab in labels]
        if model is not None:
            ours = model_labels(model, dataset, i)
            same_model += [int((lab == ours).sum()) for lab in labels]
        pixels += labels[0].size
        if gallery is not None:
            gallery.offer(i, labels[gallery.rows[0]], labels[gallery.rows[1]])
    out = []
    for j, cm in enumerate(cms):
        metrics = cm.compute()
        out.append(Accuracy(miou=float(metrics['miou']),
                            class_iou=[float(v) for v in metrics['class_iou']],
                            acc=float(metrics['acc']),
                            pixel_agreement=float(same[j] / max(pixels, 1)),
                            model_agreement=float(same_model[j] / max(pixels, 1))
                            if model is not None else None))
    return out


def model_labels(model: Any, dataset: SegDataset, index: int) -> np.ndarray:
    """Class ids of the dygraph model (in eval mode) for val image `index`, at the label
    size."""
    from paddleseg.core import infer

    from segslim._paddle import paddle
    sample = dataset[index]
    with paddle.no_grad():
        logit = infer.inference(model, paddle.to_tensor(sample['img'][np.newaxis]))
    return restore_size(logit.argmax(axis=1).numpy()[0], sample['trans_info'])


@dataclass
class Int8Check:
    """What qat_export and ptq check on their output: the INT8 engine's mIoU, and the FP32
    engine's and the pixel agreement with it (when given an FP32 folder), and the agreement
    with the dygraph model (when given one)."""
    miou: float
    fp32_miou: Optional[float] = None
    agreement: Optional[float] = None
    model_agreement: Optional[float] = None


def check_int8_engine(dataset: SegDataset, int8_dir: str, limit: int, model: Any = None,
                      fp32_dir: Optional[str] = None, backend: str = 'paddle') -> Int8Check:
    """The check qat_export and ptq run on their output: the INT8 engine (CPU; Paddle
    Inference's oneDNN unless `backend` says otherwise) on the first `limit` val images, its
    mIoU and pixel agreement with the FP32 engine of `fp32_dir` and/or the dygraph `model`
    (the QAT model). Logged, and a warning when INT8 agrees with the model on less than
    99.9 % of pixels or loses more than 1 mIoU point against FP32. Every quantized layer
    runs INT8 (--int8_layers all): the check covers all the INT8 the model holds, and the
    kinds --int8_layers auto leaves in float at deployment only take roundings away."""
    int8 = create_predictor(int8_dir, EngineOptions(backend=backend, precision='int8',
                                                    int8_layers='all'))
    predictors: List[EngineBase] = [int8]
    if fp32_dir:
        predictors.insert(0, create_predictor(fp32_dir, EngineOptions(backend=backend)))
    rows = evaluate_engines(predictors, dataset, limit, model, desc='Checking the INT8 engine')
    n = min(limit, len(dataset))
    if int8.fallback:
        logger.warning('INT8 engine: %s', int8.fallback)
    result = Int8Check(miou=rows[-1].miou)
    ops = f'{BACKENDS[backend].label}, {int8.ops.int8_conv_ops}/{int8.ops.conv_ops} convs INT8'
    if fp32_dir:
        result.fp32_miou, result.agreement = rows[0].miou, rows[-1].pixel_agreement
        ok = within_bound(rows[0].miou, result.miou, 0.01)
        (logger.info if ok else logger.warning)(
            'INT8 engine (%s): mIoU %.4f vs FP32 engine %.4f on %d val images, '
            '%.4f%% of pixels agree', ops, result.miou, rows[0].miou, n,
            100 * rows[-1].pixel_agreement)
    if model is not None:
        share = result.model_agreement = rows[-1].model_agreement or 0.0
        (logger.info if share >= 0.999 else logger.warning)(
            'INT8 engine (%s) agrees with the QAT model on %.4f%% of pixels (%d val '
            'images)', ops, 100 * share, n)
    return result


# Seconds an engine's idle threads may keep spinning after its last run: Paddle's Intel
# OpenMP keeps its pool busy for KMP_BLOCKTIME (200 ms by default). Measured on 2 cores: an
# onnxruntime INT8 model that ran 24 ms alone ran 39-46 ms when timed between Paddle
# Inference runs, and 25 ms with this pause.
SETTLE_S = 0.25
# A timed sample is the mean of as many runs as last this long (at most MAX_SAMPLE_RUNS):
# BiSeNetV2's INT8 row and PaddleSlim's, the same oneDNN program to 1 %, timed one run per
# sample (median of 5) came out 45.2 against 38.2 ms (Intel Xeon with AMX, 2 threads).
MIN_SAMPLE_S = 0.1
MAX_SAMPLE_RUNS = 50


@dataclass
class Companion:
    """A predictor timed in a benchmark's turns on its own input without being one of its
    rows: `samples_s` gets its seconds per run of each turn. The CPU ceiling probe is timed
    so (segslim.bench.ceiling), in the same minutes as the rows it is set against: on a
    shared VM the probe alone moved from 1.45x to 2.22x within two hours."""
    predictor: EngineBase
    batch: np.ndarray
    samples_s: List[float] = field(default_factory=list)


def time_interleaved(predictors: Sequence[EngineBase], batches: Sequence[np.ndarray],
                     warmup: int, repeats: int,
                     min_sample_s: float = MIN_SAMPLE_S) -> List[List[float]]:
    """Seconds per run of each predictor on its batch (`batches`: one per predictor),
    `repeats` samples each. Every turn times each engine's predictors in turns (machine
    noise that comes and goes hits all of them alike), engine after engine with a pause of
    SETTLE_S between engines: an engine that ran before keeps its threads spinning for a
    while, which would otherwise be charged to the next one.
    Each sample follows an untimed run of the same predictor, for the same reason within an
    engine, and is the mean of as many runs as fill `min_sample_s` at that untimed run's
    speed (one run of a light model is no longer than the machine's own hiccups). The
    predictors of an engine take turns in a rotating order, so that each is timed in every
    place of the turn equally often: the one right after another model ran slower
    (STDC2 on Paddle Inference after its FP32 row: 1.5-3 % against the same model later in
    the turn), which a fixed order charged to the same row every turn."""
    groups: Dict[str, List[int]] = {}
    for i, p in enumerate(predictors):
        groups.setdefault(p.backend, []).append(i)
    if len(batches) != len(predictors):
        raise ValueError(f'{len(batches)} batches for {len(predictors)} predictors')
    for p, batch in zip(predictors, batches):
        for _ in range(warmup):
            p.run(batch)
    times: List[List[float]] = [[] for _ in predictors]
    for turn in progress(range(repeats), 'Timing'):
        for members in groups.values():
            if len(groups) > 1:
                time.sleep(SETTLE_S)
            shift = turn % len(members)
            for i in members[shift:] + members[:shift]:
                tic = time.perf_counter()
                predictors[i].run(batches[i])
                once = time.perf_counter() - tic
                runs = max(1, min(MAX_SAMPLE_RUNS, math.ceil(min_sample_s / max(once, 1e-9))))
                tic = time.perf_counter()
                for _ in range(runs):
                    predictors[i].run(batches[i])
                times[i].append((time.perf_counter() - tic) / runs)
    return times


def benchmark(model_dirs: Sequence[str], dataset: Optional[SegDataset], opts: EngineOptions,
              shape: Sequence[int] = TIMING_SHAPE, warmup: int = 5, repeats: int = 20,
              with_bf16: Optional[bool] = None,
              backends: Sequence[str] = ('paddle',),
              gallery: Optional[GalleryPick] = None,
              sample_batches: Sequence[np.ndarray] = (),
              companions: Sequence[Companion] = ()) -> BenchReport:
    """Every model dir on every backend; the first model dir on the first backend (in FP32)
    is the baseline for speedup and pixel agreement, and FP32 models also get a bf16 row
    where the CPU has bf16. With a dataset, every row gets its Accuracy and `gallery`
    collects the val images where the first INT8 row agrees least with the first row;
    without one, `sample_batches` (preprocessed N,C,H,W images) give each row its pixel
    agreement with the first. A peer quantizer's folder (segslim.bench.peers) runs only on the
    engine it was made for. Every INT8 row gets its gain over its engine's FP32
    (segslim.bench.ceiling puts it against what the CPU allows). `companions` are timed in
    the same turns as the rows, each on its own batch."""
    check_engine_options(opts)
    cpu = cpu_features()
    runs = []  # each row is labelled with what its engine ran
    float_precision = 'fp16' if opts.precision == 'fp16' else 'fp32'
    bf16 = with_bf16 if with_bf16 is not None else cpu['bf16']
    for backend in backends:
        for i, model_dir in enumerate(model_dirs):
            if i and not runs_model(backend, model_dir):  # IR, ONNX-only or a peer's folder
                logger.info('%s is not for %s; no row', model_dir, BACKENDS[backend].label)
                continue
            # an engine's choices at load (INT8 per kind) are made at the shape timed here
            run_opts = dataclasses.replace(opts, precision=float_precision, backend=backend,
                                           input_shape=tuple(shape))
            pred = create_predictor(model_dir, run_opts)
            runs.append(pred)
            # a bf16 row: the FP32 baseline in bf16, and each INT8 model with its unquantized
            # ops in bf16 where the engine can
            if opts.device == 'cpu' and bf16 and (
                    (i == 0 and opts.enable_mkldnn and not pred.quantized and
                     BACKENDS[backend].bf16) or (pred.int8_ran and BACKENDS[backend].bf16_rest
                                                 and not pred.rest)):
                runs.append(create_predictor(model_dir,
                                             dataclasses.replace(run_opts, precision='bf16')))
    batch = timing_batch(runs[0], dataset, shape)
    times = time_interleaved(runs + [c.predictor for c in companions],
                             [batch] * len(runs) + [c.batch for c in companions], warmup, repeats)
    for companion, secs in zip(companions, times[len(runs):]):
        companion.samples_s = secs
    rows = [BenchRow(model_dir=pred.model_dir, backend=pred.backend, precision=pred.precision,
                     precision_note=pred.precision_note,
                     s_per_img=float(np.median(secs)) / shape[0],
                     samples_s=[t / shape[0] for t in secs],
                     p90_s=float(np.percentile(secs, 90)) / shape[0],
                     params_mb=os.path.getsize(pred.deploy['params']) / 2 ** 20,
                     ops=pred.ops, fallback=pred.fallback,
                     engine_fp32_convs=len(pred.fp32_convs), passes=pred.passes,
                     peer=pred.peer, rest=pred.rest, engine_version=pred.engine_version)
            for pred, secs in zip(runs, times)]
    report = BenchReport(isa=cpu['isa'] if opts.device == 'cpu' else 'gpu', cpu=cpu['model'],
                         vnni=bool(cpu['vnni']), threads=opts.cpu_threads, device=opts.device,
                         input_shape=list(shape), warmup=warmup, repeats=repeats, rows=rows,
                         versions=package_versions(ENGINE_STACK))
    if dataset is not None:
        int8 = report.first_int8()
        pick = gallery if int8 is not None else None
        if pick is not None and int8 is not None:
            pick.rows = (0, int8)
        logger.info('Evaluating %d rows on %d val images', len(runs), len(dataset))
        for row, accuracy in zip(rows, evaluate_engines(runs, dataset, gallery=pick)):
            row.accuracy = accuracy
    elif sample_batches:
        for row, share in zip(rows, sample_agreement(runs, sample_batches)):
            row.sample_agreement = share
    bf16_row = min((r for r in rows if r.precision is Precision.BF16),
                   key=lambda r: r.s_per_img, default=None)
    engine_fp32: Dict[str, BenchRow] = {}
    for row in rows:
        if row.precision is Precision.FP32 and not row.quantized:
            engine_fp32.setdefault(row.backend, row)
    for row in rows:
        row.speedup = row_ratio(rows[0], row)
        row.speedup_vs_bf16 = row_ratio(bf16_row, row) if bf16_row else None
        if row.int8 and row.backend in engine_fp32:
            row.speedup_vs_engine_fp32 = row_ratio(engine_fp32[row.backend], row)
    return report


def sample_agreement(predictors: Sequence[EngineBase],
                     batches: Sequence[np.ndarray]) -> List[float]:
    """Per predictor, the share of pixels it labels as the first predictor does on the
    batches (images already through the deploy transforms, at the export's input size)."""
    same = np.zeros(len(predictors), np.int64)
    pixels = 0
    for batch in batches:
        labels = [p.labels(batch) for p in predictors]
        same += [int((lab == labels[0]).sum()) for lab in labels]
        pixels += labels[0].size
    return [float(n / max(pixels, 1)) for n in same]


def timing_batch(pred: EngineBase, dataset: Optional[SegDataset],
                  shape: Sequence[int]) -> np.ndarray:
    """A real val image resized to `shape` (random data if there is no dataset)."""
    n, c, h, w = shape
    if dataset is None:
        return np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    img, _ = Preprocessor(pred.deploy['transforms'])(dataset.file_list[0][0])
    return np.repeat(resize_chw(img, h, w)[np.newaxis], n, axis=0)
