"""What a deployed engine measured, as values with a type: the op summary (what ran INT8),
one benchmark row, the benchmark report, and the precision as an enum with its note apart.

Everything that reads a result reads attributes; JSON is written from these types here and
nowhere else (`to_json`), with the keys report.json has always had."""
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


def row_ratio(slow: BenchRow, fast: BenchRow) -> float:
    """paired_ratio of two rows of one timing run (their s_per_img without samples)."""
    return paired_ratio(slow.samples_s or [slow.s_per_img], fast.samples_s or [fast.s_per_img])


# The engines' own quantizers a benchmark times beside ours (segslim.bench.peers), by the name
# their keys in benchmark.json carry.
PEER_LABELS = {'nncf_openvino': 'NNCF nncf.quantize',
               'onnxruntime_quantize_static': 'onnxruntime quantize_static',
               'paddleslim_ptq_paddle': 'PaddleSlim quant_post_static'}


@dataclass(frozen=True)
class PeerResult:
    """A peer quantizer's model against ours on the engine it was made for: `ours` is our
    fastest INT8 row there (None: we have none), `vs_ours` the peer's time over ours (>= 1:
    ours is at least as fast)."""
    row: BenchRow
    ours: Optional[BenchRow]

    @property
    def name(self) -> str:
        return self.row.peer or ''

    @property
    def vs_ours(self) -> Optional[float]:
        return row_ratio(self.row, self.ours) if self.ours else None


@dataclass(frozen=True)
class Gain:
    """INT8 as a user sees it: the fastest INT8 row (any engine) against the fastest
    unquantized row (FP32 or bf16, any engine), and that as a share of the same ratio on
    the CPU's compute-bound probe."""
    best_int8: BenchRow
    best_unquantized: BenchRow
    of_ceiling: Optional[float]

    @property
    def gain(self) -> float:
        return row_ratio(self.best_unquantized, self.best_int8)

    KEYS = ('best_int8_s', 'best_int8_engine', 'best_unquantized_s', 'best_unquantized_engine',
            'best_unquantized_precision', 'gain', 'gain_of_ceiling')

    def to_json(self) -> Dict[str, JsonValue]:
        return {'best_int8_s': self.best_int8.s_per_img,
                'best_int8_engine': self.best_int8.backend,
                'best_unquantized_s': self.best_unquantized.s_per_img,
                'best_unquantized_engine': self.best_unquantized.backend,
                'best_unquantized_precision': self.best_unquantized.precision.value,
                'gain': self.gain, 'gain_of_ceiling': self.of_ceiling}


@dataclass(frozen=True)
class Ceiling:
    """One engine's probe: seconds per run in FP32, INT8 (None: the engine ran no conv
    INT8) and bf16 (None: not run), what ran (convs INT8 over convs), and each precision's
    timed turns (its ratios are paired_ratio's; without turns, ratios of the times)."""
    backend: str
    fp32_s: float
    int8_s: Optional[float]
    bf16_s: Optional[float]
    ran: str
    fp32_samples: Tuple[float, ...] = ()
    int8_samples: Tuple[float, ...] = ()
    bf16_samples: Tuple[float, ...] = ()

    def turns(self, precision: str) -> Sequence[float]:
        """The timed turns of 'fp32', 'int8' or 'bf16' (its time alone without them)."""
        samples = getattr(self, f'{precision}_samples')
        return samples or [getattr(self, f'{precision}_s')]

    @property
    def int8_x(self) -> Optional[float]:
        return paired_ratio(self.turns('fp32'), self.turns('int8')) if self.int8_s else None

    @property
    def bf16_x(self) -> Optional[float]:
        return paired_ratio(self.turns('fp32'), self.turns('bf16')) if self.bf16_s else None

    def to_json(self) -> Dict[str, JsonValue]:
        return {'int8_x': self.int8_x, 'bf16_x': self.bf16_x, 'fp32_s': self.fp32_s,
                'int8_s': self.int8_s, 'bf16_s': self.bf16_s, 'ran': self.ran}


def int8_vs_best_unquantized(ceilings: Dict[str, Ceiling]) -> Optional[float]:
    """The probe's fastest unquantized time (FP32 or bf16, any engine) over its fastest INT8
    time (any engine), paired by turn: the most a model's best INT8 row can gain over its
    best unquantized row on this CPU."""
    int8 = [(c.int8_s, c.turns('int8')) for c in ceilings.values() if c.int8_s]
    if not int8:
        return None
    unquantized = [(t, c.turns(p)) for c in ceilings.values()
                   for t, p in ((c.fp32_s, 'fp32'), (c.bf16_s, 'bf16')) if t]
    return paired_ratio(min(unquantized)[1], min(int8)[1])


@dataclass
class BenchReport:
    """Every row of one benchmark run, with what it ran on: the first row (FP32 on the
    first engine) is the baseline of `speedup` and pixel agreement."""
    isa: str
    cpu: str
    vnni: bool
    threads: int
    device: str
    input_shape: List[int]
    warmup: int
    repeats: int
    rows: List[BenchRow]
    gallery: Optional[List[Dict[str, JsonValue]]] = None
    ceiling: Optional[Dict[str, Ceiling]] = None  # segslim.bench.ceiling's probe per engine
    versions: Dict[str, str] = field(default_factory=dict)  # python and compat.ENGINE_STACK

    @property
    def ceiling_gain(self) -> Optional[float]:
        """The probe's best INT8 over its best unquantized time (int8_vs_best_unquantized)."""
        return int8_vs_best_unquantized(self.ceiling) if self.ceiling else None

    def ceiling_json(self) -> Dict[str, JsonValue]:
        """The probe per engine and int8_vs_best_unquantized, as report.json keeps them."""
        out: Dict[str, JsonValue] = {b: c.to_json() for b, c in (self.ceiling or {}).items()}
        out['int8_vs_best_unquantized'] = self.ceiling_gain
        return out

    @property
    def ours(self) -> List[BenchRow]:
        """The rows of our models (not a peer quantizer's)."""
        return [r for r in self.rows if r.peer is None]

    def peers(self) -> List[PeerResult]:
        """Each peer quantizer's fastest row against our fastest INT8 row on its engine."""
        fastest: Dict[str, BenchRow] = {}
        for row in self.rows:
            if row.peer is not None and (row.peer not in fastest or
                                         row.s_per_img < fastest[row.peer].s_per_img):
                fastest[row.peer] = row
        out = []
        for row in fastest.values():
            ours = [r for r in self.ours if r.int8 and r.backend == row.backend]
            out.append(PeerResult(row, min(ours, key=lambda r: r.s_per_img) if ours else None))
        return out

    def peers_json(self) -> Dict[str, JsonValue]:
        """'peers': {<peer>_s: seconds per image}, 'ours_vs_peers': {<peer>: the peer's time
        over ours}, 'peer_agreement': {<peer>: pixel agreement with the first row}."""
        results = self.peers()
        return {'peers': {f'{p.name}_s': p.row.s_per_img for p in results},
                'ours_vs_peers': {p.name: p.vs_ours for p in results},
                'peer_agreement': {p.name: p.row.agreement for p in results}}

    def gain(self) -> Optional[Gain]:
        """The Gain of our rows, None without an INT8 row or an unquantized one."""
        int8 = [r for r in self.ours if r.int8]
        float_rows = [r for r in self.ours if not r.quantized]
        if not int8 or not float_rows:
            return None
        best = min(int8, key=lambda r: r.s_per_img)
        base = min(float_rows, key=lambda r: r.s_per_img)
        ratio = row_ratio(base, best)
        return Gain(best, base, ratio / self.ceiling_gain if self.ceiling_gain else None)

    @property
    def has_accuracy(self) -> bool:
        return bool(self.rows) and all(r.accuracy is not None for r in self.rows)

    def first_int8(self) -> Optional[int]:
        """The index of our first INT8 row."""
        return next((i for i, r in enumerate(self.rows) if r.int8 and r.peer is None), None)

    def to_json(self) -> Dict[str, JsonValue]:
        out: Dict[str, JsonValue] = {
            'isa': self.isa, 'cpu': self.cpu, 'vnni': self.vnni, 'threads': self.threads,
            'device': self.device, 'input_shape': list(self.input_shape),
            'warmup': self.warmup, 'repeats': self.repeats, 'versions': dict(self.versions),
            'rows': [r.to_json() for r in self.rows]}
        if self.gallery is not None:
            out['gallery'] = self.gallery
        if self.ceiling is not None:
            out['ceiling'] = self.ceiling_json()
        gain = self.gain()
        if gain is not None:
            out.update(gain.to_json())
        if any(r.peer for r in self.rows):
            out.update(self.peers_json())
        return out


def within_bound(reference: float, miou: float, max_drop: float) -> bool:
    """The one rule for 'INT8 keeps the mIoU': it loses at most `max_drop` against the FP32
    reference on the same engine."""
    return reference - miou <= max_drop
