"""Paddle's post-training calibration as segslim runs it (`paddle_calibration`).

Three things differ from calling quant_post_static as it is, none in the scales it finds
or the program it saves:

- **Float activations only.** Paddle observes the output of every op it can quantize or
  observe, `slice` among them. A model that takes its input's shape apart at run time
  (SegFormer's `reshape([paddle.shape(x)[0], ...])`) hands it 0-d integer tensors, which
  the avg algorithm cannot reduce per sample (an IndexError in Paddle 2.6) and which no
  engine quantizes. They are left out as Paddle leaves out empty tensors.
- **KL thresholds in numpy.** Paddle's KL search is pure Python: for each of about 1000
  candidate clipping bins it builds the 127-level distribution bin by bin, about 2 s per
  activation of a 2048-bin histogram, so `--algo KL` took minutes on a model of a few
  hundred activations. `kl_threshold` computes the same divergences with arrays and picks
  the same bin.
- **Graph edits without a scan per edit.** Inserting the quantize/dequantize pairs links
  nodes with IrGraph.link_to and update_input_link, each of which first checks that its
  nodes are in the graph by listing every node of it: quadratic in the graph's size, a
  quarter of FCN-HRNetW18's PTQ time. The nodes come from the graph being edited, so the
  edits run without that check."""
import contextlib
from typing import Any, Iterator

import numpy as np


def kl_threshold(hist: np.ndarray, bin_width: float, bits: int) -> float:
    """Paddle's cal_kl_threshold: of the clipping bins from the histogram's middle on, the
    first whose 2^(bits-1)-1 level quantization (outliers added to the last kept bin, empty
    bins kept empty) has the least KL divergence from the clipped histogram; the threshold is
    that bin's centre."""
    hist = np.asarray(hist, dtype=np.float64).ravel()
    bins = hist.shape[0]
    start = int((bins - 1) * 0.5)
    levels = 2 ** (bits - 1) - 1
    total = hist.sum()
    tail = np.append(np.cumsum(hist[::-1])[::-1], 0.0)  # tail[i] = hist[i:].sum()
    best, best_bin = np.inf, 0
    for i in range(start, bins):
        if hist[i - 1] == 0:
            continue
        p = hist[:i].copy()
        p[i - 1] += tail[i]
        merged = int(i / levels)  # bins per level; the last level takes the rest
        level = np.minimum(np.arange(i) // merged, levels - 1) if merged \
            else np.full(i, levels - 1)
        used = p != 0
        sums = np.bincount(level, weights=hist[:i], minlength=levels)
        counts = np.bincount(level, weights=used, minlength=levels)
        mean = np.divide(sums, counts, out=np.zeros(levels), where=counts > 0)
        q = np.where(used, mean[level], 0.0)
        pu, qu = p[used], q[used]
        kl = (np.sum(pu * np.log(q.sum() * pu)) - np.sum(pu * np.log(total * qu))) / total
        if kl < best:
            best, best_bin = kl, i
    if best_bin == 0:  # no candidate: the last non-empty bin of the first half
        while start > 0 and hist[start] == 0:
            start -= 1
        best_bin = start
    return float((best_bin + 0.5) * bin_width)


@contextlib.contextmanager
def paddle_calibration() -> Iterator[None]:
    """Within it, Paddle's post-training quantization (quant_post_static, AdaRound and
    reconstruction alike) calibrates float activations only and finds KL thresholds with
    `kl_threshold`."""
    from paddle.base.data_feeder import convert_dtype
    from paddle.static.quantization import post_training_quantization as ptq_module
    cls = ptq_module.PostTrainingQuantization
    original_collect, original_kl = cls._collect_target_varnames, ptq_module.cal_kl_threshold

    def collect(self: Any) -> None:
        original_collect(self)
        dtypes = {var.name: convert_dtype(var.dtype) for var in self._program.list_vars()
                  if var.name in self._quantized_act_var_name}
        for name, dtype in dtypes.items():
            if not dtype.startswith(('float', 'bfloat')):
                self._quantized_act_var_name.discard(name)
                self._zero_size_var_names.add(name)
    from paddle.base.framework import IrGraph
    original_link, original_update = IrGraph.link_to, IrGraph.update_input_link

    def link_to(self: Any, node_in: Any, node_out: Any) -> None:
        node_in.append_output(node_out)
        node_out.append_input(node_in)

    def update_input_link(self: Any, old: Any, new: Any, op_node: Any) -> None:
        old.remove_output(op_node)
        op_node.remove_input(old)
        new.append_output(op_node)
        op_node.append_input(new)
        op_node.rename_input(old.name(), new.name())
    cls._collect_target_varnames = collect
    ptq_module.cal_kl_threshold = kl_threshold
    IrGraph.link_to, IrGraph.update_input_link = link_to, update_input_link
    try:
        yield
    finally:
        cls._collect_target_varnames = original_collect
        ptq_module.cal_kl_threshold = original_kl
        IrGraph.link_to, IrGraph.update_input_link = original_link, original_update
