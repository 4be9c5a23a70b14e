"""INT8 only where it pays: which kinds of quantized layer an engine runs faster in INT8 than
in float on this CPU, measured on the model itself with the engine's reorders.

The kinds are the convolution shapes whose INT8 kernels differ most from their float ones:
`depthwise` (one input channel per group), `grouped` (other grouped convs), `pointwise`
(1x1) and `spatial` (larger kernels), and `matmul`. An engine builds the model with a set of
kinds in float (their input quantization removed, their weights dequantized) and
choose_float_kinds times the variants interleaved: a kind stays INT8 only when the model
with it in float is not faster. Running a layer in float never loses accuracy against the
INT8 model (it drops a rounding), so the choice is made on speed alone."""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Sequence

import numpy as np

from segslim.logger import logger

KINDS = ('depthwise', 'grouped', 'pointwise', 'spatial', 'matmul')
# A variant must be this much faster than the model it is compared with to change the
# choice: below it, timing noise decides.
MARGIN = 0.03
WARMUP = 2
REPEATS = 9


def conv_kind(groups: int, in_channels_per_group: int, out_channels_per_group: int,
              kernel: Sequence[int]) -> str:
    """The kind of a convolution from its groups, channels per group and kernel size."""
    if groups > 1:
        return 'depthwise' if in_channels_per_group == 1 and out_channels_per_group == 1 \
            else 'grouped'
    return 'pointwise' if all(k == 1 for k in kernel) else 'spatial'


@dataclass
class KindChoice:
    """What choose_float_kinds decided: the kinds run in float, and the seconds per run it
    measured for each variant tried (by the kinds in float, sorted, joined by '+'; 'none'
    for the model as quantized)."""
    float_kinds: FrozenSet[str] = frozenset()
    seconds: Dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.float_kinds:
            return ''
        return '{} layers run in float: INT8 does not pay for them on this CPU ({})'.format(
            ', '.join(sorted(self.float_kinds)), ', '.join(
                f'{k} {1000 * s:.1f} ms' for k, s in self.seconds.items()))


def _label(kinds: FrozenSet[str]) -> str:
    return '+'.join(sorted(kinds)) or 'none'


@dataclass(frozen=True)
class Paired:
    """Two callables timed in turns: each one's lower-quartile seconds, and the median over
    the turns of the second's time over the first's in the same turn."""
    first_s: float
    second_s: float
    ratio: float


def _paired(first: Callable[[], object], second: Callable[[], object]) -> Paired:
    """The two timed in turns, each timed run after an untimed one (the engine's threads
    spin down between callables), REPEATS turns. A turn's ratio compares two runs a few
    milliseconds apart, so load on the machine that comes and goes over seconds (which
    moved the lower quartiles of the two by more than MARGIN in either direction) falls
    on both sides of it."""
    for run in (first, second):
        for _ in range(WARMUP):
            run()
    times: List[List[float]] = [[], []]
    for _ in range(REPEATS):
        for i, run in enumerate((first, second)):
            run()
            tic = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - tic)
    a, b = (np.asarray(t) for t in times)
    return Paired(float(np.percentile(a, 25)), float(np.percentile(b, 25)),
                  float(np.median(b / a)))


def choose_float_kinds(present: Sequence[str],
                       build: Callable[[FrozenSet[str]], Callable[[], object]]
                       ) -> KindChoice:
    """Greedy over the kinds `present` in the model: `build(kinds)` returns a callable that
    runs the model once with those kinds in float. Each kind is tried on top of the kinds
    already chosen; it joins them when that variant is faster by MARGIN (the median of
    paired ratios, see _paired)."""
    chosen: FrozenSet[str] = frozenset()
    quantized = best = build(chosen)
    choice = KindChoice()
    for kind in (k for k in KINDS if k in present):
        trial_kinds = chosen | {kind}
        trial = build(trial_kinds)
        timed = _paired(best, trial)
        choice.seconds[_label(chosen)] = timed.first_s
        choice.seconds[_label(trial_kinds)] = timed.second_s
        if timed.ratio < 1 - MARGIN:
            chosen, best = trial_kinds, trial
    if len(chosen) > 1:  # the choice against the model as quantized, side by side once more
        timed = _paired(quantized, best)
        choice.seconds['none'], choice.seconds[_label(chosen)] = timed.first_s, timed.second_s
        if timed.ratio >= 1 - MARGIN:
            chosen = frozenset()
    choice.float_kinds = chosen
    if chosen:
        logger.debug('INT8 where it pays: %s', choice.describe())
    return choice
