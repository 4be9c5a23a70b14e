"""INT8 only where it pays: which kinds of quantized layer an engine runs faster in INT8 than
in float on this CPU, measured on the model itself with the engine's reorders.

The kinds are the convolution shapes whose INT8 kernels differ most from their float ones:
`depthwise` (one input channel per group), `grouped` (other grouped convs), `pointwise`
(1x1) and `spatial` (larger kernels), and `matmul`; on OpenVINO also `pool`, the pools that
read a conv's INT8 input (openvino_graph.share_quantized_inputs), and `shuffle`, the channel
shuffles of ShuffleNet units run on INT8 (openvino_graph.hoist_quantization). An engine
builds the model with a set of kinds in float (their input quantization removed, their
weights dequantized) and choose_float_kinds times the variants interleaved: a kind stays
INT8 only when the model with it in float is not faster. Running a layer in float never
loses accuracy against the INT8 model (it drops a rounding), so the choice is made on speed
alone.

A choice is kept on disk (ChoiceCache), keyed by the model's files, the engine and its
settings and the CPU, so that every later load of the same model on this machine runs the
same layers in INT8 and gives the same answers: timing noise decides close calls, and it
decided differently from one load to the next. A choice timed while other work held the
cores (machine_busy) is kept only until a load finds the machine quiet, which times it
again: on a loaded machine every variant slows and the margin keeps kinds in float that
INT8 speeds up on quiet cores (a test run of 4 workers on 2 cores put every kind of a model
in float)."""
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from segslim.deploy.results import paired_ratio
from segslim.fileio import write_json
from segslim.logger import logger
from segslim.machine import machine_busy

# Where measured choices are kept: $SEGSLIM_CACHE_DIR/int8_kinds ('off' keeps none), else
# $XDG_CACHE_HOME/segslim/int8_kinds or ~/.cache/segslim/int8_kinds.
CACHE_ENV = 'SEGSLIM_CACHE_DIR'
# Choices kept at most (each a few hundred bytes); the oldest go first.
CACHE_FILES = 1000

# Changed with what choose_float_kinds tries: a choice made by an earlier version is timed
# again (2: every kind in float is tried as well).
CHOICE_VERSION = 2

KINDS = ('depthwise', 'grouped', 'pointwise', 'spatial', 'matmul', 'pool', 'shuffle')
# A variant must be this much faster than the model it is compared with to change the
# choice: below it, timing noise decides.
MARGIN = 0.03
# What a variant's time over the model's it is compared with must be under to be chosen.
THRESHOLD = 1 - MARGIN
WARMUP = 2
REPEATS = 9
# A comparison ends after this many turns when each of them is on the same side of
# THRESHOLD by more than twice the margin (a clear call), or when its turns have taken
# TURNS_BUDGET_S seconds: with nine turns a comparison, the choice on a 1024x512 ResNet50
# model (ANN, OpenVINO) took ten minutes on two AVX2 cores, six with clear calls cut short
# (its close call on pools took eighteen turns of runs over a second each).
CLEAR_TURNS = 3
TURNS_BUDGET_S = 30.0


def conv_kind(groups: int, in_channels_per_group: int, out_channels_per_group: int,
              kernel: Sequence[int]) -> str:
    """The kind of a convolution from its groups, channels per group and kernel size."""
    if groups > 1:
        return 'depthwise' if in_channels_per_group == 1 and out_channels_per_group == 1 \
            else 'grouped'
    return 'pointwise' if all(k == 1 for k in kernel) else 'spatial'


@dataclass
class KindChoice:
    """What choose_float_kinds decided: the kinds run in float, the seconds per run it
    measured for each variant tried (by the kinds in float, sorted, joined by '+'; 'none'
    for the model as quantized; a variant timed twice keeps its last pair), and each
    comparison in order: (variant, the variant it was timed against, the median of the
    paired ratios of their times)."""
    float_kinds: FrozenSet[str] = frozenset()
    seconds: Dict[str, float] = field(default_factory=dict)
    # the cache file this choice was read from (None: measured in this process)
    cached: Optional[str] = None
    trials: List[Tuple[str, str, float]] = field(default_factory=list)

    def describe(self) -> str:
        if not self.float_kinds:
            return ''
        timed = ', '.join(f'{variant} {ratio:.2f}x of {base}'
                          for variant, base, ratio in self.trials) or ', '.join(
            f'{k} {1000 * s:.1f} ms' for k, s in self.seconds.items())
        return '{} layers run in float: INT8 does not pay for them on this CPU ({}{}{})'.format(
            ', '.join(sorted(self.float_kinds)),
            'time of each variant over the one it was timed against: ' if self.trials else '',
            timed, f'; measured at an earlier load, kept in {self.cached}' if self.cached else '')


class ChoiceCache:
    """Measured choices on disk, one JSON file per key: the sha256 of `settings`, of
    CHOICE_VERSION and of the contents of `files`. A cache that cannot be read or written
    is passed over (a read-only home must not stop a run)."""

    def __init__(self, files: Sequence[str], settings: Dict[str, Any]):
        self.path: Optional[str] = None
        folder = cache_dir()
        if folder is None:  # turned off: the model files are not read
            return
        digest = hashlib.sha256(json.dumps({**settings, 'choice': CHOICE_VERSION},
                                           sort_keys=True).encode())
        for path in files:
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 20), b''):
                    digest.update(block)
        self.path = os.path.join(folder, digest.hexdigest() + '.json')

    def load(self) -> Optional[KindChoice]:
        if self.path is None or not os.path.isfile(self.path):
            return None
        try:
            with open(self.path) as f:
                data = json.load(f)
            if data.get('busy') and not machine_busy():
                logger.info('INT8 per kind: the choice in %s was timed on a busy machine; '
                            'timing it again', self.path)
                return None
            return KindChoice(frozenset(data['float_kinds']),
                              {str(k): float(v) for k, v in data['seconds'].items()},
                              cached=self.path,
                              trials=[(str(v), str(b), float(r))
                                      for v, b, r in data.get('trials', [])])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.debug('INT8 per kind: ignoring %s (%s)', self.path, e)
            return None

    def save(self, choice: KindChoice) -> None:
        if self.path is None:
            return
        try:
            folder = os.path.dirname(self.path)
            os.makedirs(folder, exist_ok=True)
            write_json(self.path, {'float_kinds': sorted(choice.float_kinds),
                                   'seconds': choice.seconds,
                                   'trials': [list(t) for t in choice.trials],
                                   'busy': machine_busy()})
            kept = sorted((os.path.join(folder, n) for n in os.listdir(folder)),
                          key=os.path.getmtime)
            for old in kept[:-CACHE_FILES]:  # the oldest go
                os.remove(old)
        except Exception as e:  # UserError (unwritable) or OSError
            logger.debug('INT8 per kind: could not keep the choice in %s (%s)', self.path, e)


def cache_dir() -> Optional[str]:
    """The folder of ChoiceCache files (see CACHE_ENV), None when turned off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        if value.strip().lower() in ('', 'off', '0', 'none'):
            return None
        return os.path.join(value, 'int8_kinds')
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'segslim', 'int8_kinds')


def _label(kinds: FrozenSet[str]) -> str:
    return '+'.join(sorted(kinds)) or 'none'


@dataclass(frozen=True)
class Paired:
    """Two callables timed in turns: the seconds of each timed run, turn by turn."""
    first: Tuple[float, ...]
    second: Tuple[float, ...]

    @property
    def first_s(self) -> float:
        """The first's lower-quartile seconds."""
        return float(np.percentile(self.first, 25))

    @property
    def second_s(self) -> float:
        return float(np.percentile(self.second, 25))

    @property
    def ratio(self) -> float:
        """The median over the turns of the second's time over the first's in the same turn."""
        return paired_ratio(self.second, self.first)

    def __add__(self, other: 'Paired') -> 'Paired':
        return Paired(self.first + other.first, self.second + other.second)


def _paired(first: Callable[[], object], second: Callable[[], object],
            stop_when_clear: bool = True) -> Paired:
    """The two timed in turns, each timed run after an untimed one (the engine's threads
    spin down between callables), REPEATS turns; at least CLEAR_TURNS, and no more once
    the turns have taken TURNS_BUDGET_S or, when `stop_when_clear`, are a clear call
    (_clear). A turn's ratio compares two runs a few milliseconds apart, so load on the
    machine that comes and goes over seconds (which moved the lower quartiles of the two by
    more than MARGIN in either direction) falls on both sides of it."""
    for run in (first, second):
        for _ in range(WARMUP):
            run()
    times: List[List[float]] = [[], []]
    start = time.perf_counter()
    for turn in range(1, REPEATS + 1):
        for i, run in enumerate((first, second)):
            run()
            tic = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - tic)
        if turn >= CLEAR_TURNS and (time.perf_counter() - start >= TURNS_BUDGET_S or
                                    (stop_when_clear and _clear(times[0], times[1]))):
            break
    return Paired(tuple(times[0]), tuple(times[1]))


def _clear(first: Sequence[float], second: Sequence[float]) -> bool:
    """Whether each turn put the second's time over the first's on the same side of
    THRESHOLD, more than 2 * MARGIN away: their median is then outside the band that
    _compare times again."""
    ratios = np.divide(second, first)
    return bool(np.all(ratios > THRESHOLD + 2 * MARGIN) or
                np.all(ratios < THRESHOLD - 2 * MARGIN))


def _compare(first: Callable[[], object], second: Callable[[], object]) -> Paired:
    """_paired, and once more when the ratio lands within MARGIN of THRESHOLD, the two
    pooled: on a shared VM nine turns put a kind 4 % faster in float on either side of the
    threshold from one load to the next (SegFormer-B0's larger convs on a VNNI EPYC: 0.92x
    to 1.02x in six pairings), and that flip moved the model's time by more than the kind
    itself does."""
    timed = _paired(first, second)
    if abs(timed.ratio - THRESHOLD) < MARGIN:
        timed = timed + _paired(first, second, stop_when_clear=False)
    return timed


def choose_float_kinds(present: Sequence[str],
                       build: Callable[[FrozenSet[str]], Callable[[], object]]
                       ) -> KindChoice:
    """Greedy over the kinds `present` in the model: `build(kinds)` returns a callable that
    runs the model once with those kinds in float. Each kind is tried on top of the kinds
    already chosen; it joins them when that variant is faster by MARGIN (the median of
    paired ratios, see _paired; close calls are timed twice as long, _compare). Then every
    kind in float is tried against the choice, so that a model whose INT8 does not pay as a
    whole runs at its float speed."""
    chosen: FrozenSet[str] = frozenset()
    quantized = best = build(chosen)
    choice = KindChoice()
    kinds = [k for k in KINDS if k in present]
    every = frozenset(kinds)

    def trial(trial_kinds: FrozenSet[str]) -> None:
        nonlocal chosen, best
        variant = build(trial_kinds)
        timed = _compare(best, variant)
        choice.seconds[_label(chosen)] = timed.first_s
        choice.seconds[_label(trial_kinds)] = timed.second_s
        choice.trials.append((_label(trial_kinds), _label(chosen), timed.ratio))
        if timed.ratio < THRESHOLD:
            chosen, best = trial_kinds, variant
    for kind in kinds:
        trial(chosen | {kind})
    if chosen != every and _label(every) not in choice.seconds:
        # every kind in float, unless the greedy steps timed it already: kinds that each
        # save less than the margin can save more together, and on onnxruntime a quantized
        # region between two kinds goes only when both are float (uint8.drop_idle_uint8)
        trial(every)
    if len(chosen) > 1:  # the choice against the model as quantized, side by side once more
        timed = _compare(quantized, best)
        choice.seconds['none'], choice.seconds[_label(chosen)] = timed.first_s, timed.second_s
        choice.trials.append((_label(chosen), 'none', timed.ratio))
        if timed.ratio >= THRESHOLD:
            chosen = frozenset()
    choice.float_kinds = chosen
    if chosen:
        logger.debug('INT8 where it pays: %s', choice.describe())
    return choice
