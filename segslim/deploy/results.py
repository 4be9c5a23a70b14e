"""What a deployed engine measured, as values with a type: the op summary (what ran INT8),
its accuracy, one benchmark row, the paired ratio of two rows' times, and the precision as
an enum with its note apart (segslim.deploy.bench_report holds the run as a whole).

Everything that reads a result reads attributes; JSON is written from these types (`to_json`)
and nowhere else, with the keys report.json has always had."""
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

JsonValue = object


class Precision(str, enum.Enum):
    """What an engine runs. A str, so 'int8' == Precision.INT8 where flags hold strings."""
    FP32 = 'fp32'
    FP16 = 'fp16'
    BF16 = 'bf16'
    INT8 = 'int8'

    @property
    def label(self) -> str:
        return self.value.upper()

    @property
    def quantized(self) -> bool:
        return self is Precision.INT8

    def __str__(self) -> str:
        return self.value


# The note of a quantized model that the engine ran with no INT8 kernel (its fake-quant ops
# simulated in FP32).
NO_INT8_NOTE = 'QAT model, no INT8 kernels'
# --int8_layers auto found INT8 slower than float for every kind of layer the model quantizes
NOT_FASTER_NOTE = 'quantized model, INT8 not faster here'


@dataclass(frozen=True)
class OpSummary:
    """What an engine ran INT8, counted over the quantizable ops (convolutions and matrix
    products) of its optimized graph. `by_type` maps an op kind to (INT8, total)."""
    int8_ops: int = 0
    quantizable_ops: int = 0
    fp32_ops: Tuple[str, ...] = ()
    by_type: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    conv_ops: int = 0
    int8_conv_ops: int = 0
    matmul_ops: int = 0
    int8_matmul_ops: int = 0

    @classmethod
    def count(cls, ops: Iterable[Tuple[str, bool, str]], conv_kinds: Sequence[str],
              matmul_kinds: Sequence[str]) -> 'OpSummary':
        """From (kind, runs INT8, name) of the engine's ops; only conv and matmul kinds
        count."""
        counts: Dict[str, List[int]] = {}
        fp32: List[str] = []
        for kind, int8, name in ops:
            if kind not in tuple(conv_kinds) + tuple(matmul_kinds):
                continue
            c = counts.setdefault(kind, [0, 0])
            c[1] += 1
            if int8:
                c[0] += 1
            else:
                fp32.append(name)

        def total(kinds: Iterable[str], idx: int) -> int:
            return sum(counts[k][idx] for k in kinds if k in counts)
        return cls(int8_ops=total(counts, 0), quantizable_ops=total(counts, 1),
                   fp32_ops=tuple(fp32), by_type={k: (v[0], v[1]) for k, v in counts.items()},
                   conv_ops=total(conv_kinds, 1), int8_conv_ops=total(conv_kinds, 0),
                   matmul_ops=total(matmul_kinds, 1), int8_matmul_ops=total(matmul_kinds, 0))

    def cell(self) -> str:
        """'47/47' INT8 over quantizable ops, split by kind where matmuls are present."""
        if not self.matmul_ops:
            return f'{self.int8_ops}/{self.quantizable_ops}'
        return (f'conv {self.int8_conv_ops}/{self.conv_ops}, '
                f'matmul {self.int8_matmul_ops}/{self.matmul_ops}')

    def to_json(self) -> Dict[str, JsonValue]:
        return {'int8_ops': self.int8_ops, 'quantizable_ops': self.quantizable_ops,
                'fp32_ops': list(self.fp32_ops),
                'by_type': {k: list(v) for k, v in self.by_type.items()},
                'conv_ops': self.conv_ops, 'int8_conv_ops': self.int8_conv_ops,
                'matmul_ops': self.matmul_ops, 'int8_matmul_ops': self.int8_matmul_ops}


@dataclass(frozen=True)
class PassChange:
    """What an engine changed in its optimization pass list."""
    appended: Tuple[str, ...] = ()
    deleted: Tuple[str, ...] = ()

    def describe(self) -> str:
        return ', '.join(['+' + p for p in self.appended] + ['-' + p for p in self.deleted])


@dataclass
class Accuracy:
    """An engine's accuracy on the val set: the training metric code's numbers, and the
    share of pixels labelled as the baseline row labels them."""
    miou: float
    class_iou: List[float]
    acc: float
    pixel_agreement: float
    # with the dygraph model (e.g. the QAT model with its fake-quant ops), where one was given
    model_agreement: Optional[float] = None


@dataclass
class BenchRow:
    """One model folder on one engine at one precision."""
    model_dir: str
    backend: str
    precision: Precision
    s_per_img: float
    p90_s: float
    params_mb: float
    ops: OpSummary
    # what the precision does not say: e.g. NO_INT8_NOTE for a quantized model run in FP32
    precision_note: Optional[str] = None
    fallback: Optional[str] = None
    engine_fp32_convs: int = 0
    passes: Optional[PassChange] = None
    accuracy: Optional[Accuracy] = None
    speedup: float = 1.0
    speedup_vs_bf16: Optional[float] = None
    # INT8 rows: the same engine's FP32 time of the first model over this row's, and that as
    # a share of the engine's INT8 ceiling on this CPU (segslim.bench.ceiling)
    speedup_vs_engine_fp32: Optional[float] = None
    of_ceiling: Optional[float] = None
    # a peer quantizer's model (segslim.bench.peers: its name, e.g. 'nncf_openvino'), not ours
    peer: Optional[str] = None
    # an INT8 row whose unquantized ops ran in this float precision ('bf16'; None: FP32)
    rest: Optional[str] = None
    # without a val set: the share of pixels labelled as the first row labels them on the
    # generated timing images
    sample_agreement: Optional[float] = None
    engine_version: Optional[str] = None  # 'paddlepaddle 2.6.2': what ran the row
    # seconds per image of each timed turn, in turn order (s_per_img is their median)
    samples_s: List[float] = field(default_factory=list)

    @property
    def int8(self) -> bool:
        return self.precision is Precision.INT8

    @property
    def quantized(self) -> bool:
        """Not a float baseline: INT8, or a quantized model the engine ran in FP32."""
        return self.int8 or self.precision_note is not None

    @property
    def miou(self) -> Optional[float]:
        return self.accuracy.miou if self.accuracy else None

    @property
    def type_label(self) -> str:
        """'INT8', 'INT8+BF16' (the rest in bf16), 'BF16', 'FP32 (QAT model, no INT8
        kernels)'."""
        label = self.precision.label + (f'+{self.rest.upper()}' if self.rest else '')
        return f'{label} ({self.precision_note})' if self.precision_note else label

    def to_json(self) -> Dict[str, JsonValue]:
        out: Dict[str, JsonValue] = {
            'model_dir': self.model_dir, 'precision': self.precision.value,
            'precision_note': self.precision_note, 'backend': self.backend,
            's_per_img': self.s_per_img, 'p90_s': self.p90_s, 'params_mb': self.params_mb,
            'samples_s': list(self.samples_s),
            'fallback': self.fallback, 'engine_fp32_convs': self.engine_fp32_convs,
            'passes': {'appended': list(self.passes.appended),
                       'deleted': list(self.passes.deleted)} if self.passes else None}
        out.update(self.ops.to_json())
        if self.accuracy is not None:
            out.update(dataclasses.asdict(self.accuracy))
            if self.accuracy.model_agreement is None:
                del out['model_agreement']
        out.update(speedup=self.speedup, speedup_vs_bf16=self.speedup_vs_bf16,
                   speedup_vs_engine_fp32=self.speedup_vs_engine_fp32,
                   of_ceiling=self.of_ceiling, peer=self.peer, rest=self.rest,
                   sample_agreement=self.sample_agreement, engine_version=self.engine_version)
        return out

    @property
    def agreement(self) -> Optional[float]:
        """Pixel agreement with the first row: on the val set, else on generated images."""
        return self.accuracy.pixel_agreement if self.accuracy else self.sample_agreement


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """How many times longer `slow` takes than `fast`, from times of the same turns: the
    median of the per-turn ratios, so that a turn the machine slowed down for both counts
    once instead of moving one median (on a shared 2-core VM the medians of five turns of
    one model moved by a third between runs while the paired ratio moved by 4 %). Without
    turns to pair, the ratio of the medians."""
    if slow and len(slow) == len(fast):
        return float(np.median(np.asarray(slow) / np.asarray(fast)))
    return float(np.median(slow) / np.median(fast))


def turn_ratios(slow: BenchRow, fast: BenchRow) -> Optional[Tuple[float, float]]:
    """The lowest and highest per-turn ratio of two rows of one timing run (how far the
    machine's noise moved the ratio that row_ratio takes the median of), None without
    paired turns."""
    if not slow.samples_s or len(slow.samples_s) != len(fast.samples_s):
        return None
    ratios = np.asarray(slow.samples_s) / np.asarray(fast.samples_s)
    return float(ratios.min()), float(ratios.max())


def row_ratio(slow: BenchRow, fast: BenchRow) -> float:
    """paired_ratio of two rows of one timing run (their s_per_img without samples)."""
    return paired_ratio(slow.samples_s or [slow.s_per_img], fast.samples_s or [fast.s_per_img])


def within_bound(reference: float, miou: float, max_drop: float) -> bool:
    """The one rule for 'INT8 keeps the mIoU': it loses at most `max_drop` against the FP32
    reference on the same engine."""
    return reference - miou <= max_drop
