"""A benchmark run as a whole, as values with a type: its rows with what they ran on, the
CPU ceiling probe per engine, the gain of the best INT8 row over the best unquantized one, and
our INT8 against the engines' own quantizers. JSON of a report is written here
(`BenchReport.to_json`), with the keys report.json has always had."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from segslim.deploy.results import BenchRow, JsonValue, paired_ratio, row_ratio, turn_ratios

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

    @property
    def vs_ours_range(self) -> Optional[Tuple[float, float]]:
        """The lowest and highest vs_ours of a single turn."""
        return turn_ratios(self.row, self.ours) if self.ours else None


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

    @classmethod
    def from_turns(cls, backend: str, ran: str, fp32: Sequence[float], int8: Sequence[float],
                   bf16: Sequence[float]) -> 'Ceiling':
        """From each precision's timed turns, its time their median (no turns: not run)."""
        def median(turns: Sequence[float]) -> Optional[float]:
            return float(np.median(turns)) if len(turns) else None
        return cls(backend, float(np.median(fp32)), median(int8), median(bf16), ran,
                   tuple(fp32), tuple(int8), tuple(bf16))

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
        over ours}, 'ours_vs_peers_range': {<peer>: [lowest, highest] of a single turn},
        'peer_agreement': {<peer>: pixel agreement with the first row}."""
        results = self.peers()
        return {'peers': {f'{p.name}_s': p.row.s_per_img for p in results},
                'ours_vs_peers': {p.name: p.vs_ours for p in results},
                'ours_vs_peers_range': {p.name: list(p.vs_ours_range) if p.vs_ours_range
                                        else None for p in results},
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
