"""Weights rounded by learning on calibration images: AdaRound (quant_post_static's
round_type='adaround') and reconstruction PTQ (quant_recon_static: AdaRound layer by layer,
BRECQ region by region, QDrop), run on PaddleSlim's and Paddle's classes with these changes:
- the learned INT8 weights are saved as learned: the ONNX-format save quantizes weights from
  float, and would quantize the learned INT8 values a second time (nearly every weight
  saturated to -128 or 127);
- reconstruction learns each layer/region on its own copy of the program, in order, instead
  of adding every region's training ops to one program that then runs all of them at every
  step (time quadratic in the number of layers); each step runs only the ops that region's
  loss and its update need (the executor's pruning: half the time on a 64-layer BiSeNetV2, the
  same learned weights), not the rest of the student and teacher networks;
- regions are found on an index of each op's producers and consumers, built once; PaddleSlim
  scans every op of the program for each query, a cube of the op count (more than an hour
  on FCN-HRNetW18 without a region found, 55 s with the index);
- ops whose gradient needs their XShape output (transposes and reshapes: SegFormer's
  attention) get it back in each region's program, which an inference model has dropped;
- each layer's rounding ops are built in a scratch program that names its variables from the
  model program's counter: PaddleSlim copies them into the model program by name, and Paddle 3
  counts names per program, so every scratch program would name its sigmoid
  `sigmoid_0.tmp_0` ("created before ... not matched" from the second layer on)."""
import os
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

from segslim._paddle import paddle
from segslim.logger import logger
from segslim.options import RECON_LEVELS, Rounding
from segslim.program import drop_inference_dropout


def _weights_back_to_float(ptq: Any) -> None:
    """AdaRound and reconstruction leave each learned weight as its INT8 value in the scope;
    the ONNX-format save (QuantWeightPass) quantizes weights from float, so it would quantize
    them a second time and saturate nearly all of them. They go back to float first (value x
    scale / 127), which that save turns into the learned INT8 values exactly."""
    from paddle.static.quantization import utils
    scales = ptq._quantized_var_threshold if ptq._algo in ('KL', 'hist') \
        else ptq._quantized_threshold
    bnt = (1 << (ptq._weight_bits - 1)) - 1
    for name in ptq._quantized_weight_var_name:
        if name in (ptq._skip_tensor_list or ()) or name not in scales:
            continue
        weight = utils.load_variable_data(ptq._scope, name)
        scale = np.asarray(scales[name], np.float32).reshape(-1)
        scale = np.where(scale == 0, np.float32(1e-8), scale)
        if scale.size > 1:  # channel-wise: along the output-channel axis of the op
            shape = [1] * weight.ndim
            shape[1 if ptq._weight_op_pairs[name] in utils._channelwise_quant_axis1_ops
                  else 0] = -1
            scale = scale.reshape(shape)
        utils.set_variable_data(ptq._scope, ptq._place, name,
                                (weight * scale / bnt).astype(np.float32))


def learned_rounding(common: Dict[str, Any], rounding: Rounding) -> None:
    """quant_post_static with round_type='adaround', or quant_recon_static, as PaddleSlim
    runs them, with the learned weights saved as learned (_weights_back_to_float)."""
    from paddle.static.quantization import PostTrainingQuantization
    from paddleslim.quant.reconstruction_quantization import (
        Collections,
        ReconstructionQuantization,
    )

    class SaveLearned:
        def _update_program(self) -> None:
            _weights_back_to_float(self)
            super()._update_program()  # type: ignore[misc]

    class Recon(SaveLearned, ReconstructionQuantization):
        def _reconstruction(self) -> None:
            module: Any = sys.modules[ReconstructionQuantization.__module__]
            originals = module.ReconstructionQuanter, module.RegionBuilder
            module.ReconstructionQuanter = _region_by_region(originals[0])
            module.RegionBuilder = _indexed_regions(originals[1])
            try:
                super()._reconstruction()
            finally:
                module.ReconstructionQuanter, module.RegionBuilder = originals

    class AdaRound(SaveLearned, PostTrainingQuantization):
        pass

    save = {'save_model_path': common.pop('quantize_model_path'),
            'model_filename': common.pop('save_model_filename'),
            'params_filename': common.pop('save_params_filename')}
    if rounding.recon:  # PaddleSlim's program merge refuses a dropout without its Mask
        drop_inference_dropout(os.path.join(common['model_dir'], common['model_filename']))
        quantizer = Recon(
            PTQCollections=Collections(**common, round_type='adaround'),
            RSQCollections=Collections(
                recon_level=RECON_LEVELS[rounding.recon],
                simulate_activation_quant=rounding.qdrop, regions=None,
                region_weights_names=None, epochs=rounding.recon_epochs, lr=rounding.recon_lr,
                limit=6))  # PaddleSlim's default region size
    else:
        quantizer = AdaRound(**common, round_type='adaround')
    quantizer.quantize()
    quantizer.save_quantized_model(**save)


def _region_by_region(base: Any) -> Any:
    """PaddleSlim's ReconstructionQuanter whose _run trains each region on a fresh copy of
    the student program (the region's loss and its Adam only); the learned roundings live in
    the scope, so later regions see the earlier ones, as in BRECQ."""
    from paddleslim.quant.reconstruction_quantization import ReconstructionQuanterLoss

    class RegionByRegion(base):
        def _insert_func(self, var: Any, scale: Any, func: str) -> Any:
            names = var._graph.program._name_generator
            original = paddle.static.Program

            def program() -> Any:
                scratch = original()
                scratch._name_generator = names
                return scratch
            paddle.static.Program = program
            try:
                return super()._insert_func(var, scale, func)
            finally:
                paddle.static.Program = original

        def _run(self) -> Any:
            from paddle.static.quantization import utils
            self._preprocess()
            began = time.monotonic()
            for k, (start, end) in enumerate(self._regions):
                program, startup = self._student_program.clone(), paddle.static.Program()
                block = program.global_block()
                for i in reversed(range(len(block.ops))):  # the executor prunes no fetch op
                    if block.ops[i].type == 'fetch':
                        block._remove_op(i)
                block.var(start).stop_gradient = True
                _restore_xshapes(block)
                names = self._region_weights_names[k]
                loss = ReconstructionQuanterLoss(program=program, weight_region_names=names)
                with paddle.static.program_guard(program, startup):
                    total = loss.get_loss(block.var(end), block.var('teacher_' + end))[0]
                    paddle.optimizer.Adam(
                        learning_rate=self._lr,
                        parameters=[block.var(n + '.alpha') for n in names]).minimize(total)
                self._exe.run(startup)
                initial = {n: np.array(utils.load_variable_data(self._scope, n + '.alpha'))
                           for n in names}
                for _ in range(self._epochs):
                    for i, data in enumerate(self._data_loader()):
                        self._exe.run(program, feed=data, fetch_list=[total.name],
                                      use_prune=True)
                        if i + 1 == self._num_iterations:
                            break
                if not all(np.isfinite(utils.load_variable_data(self._scope, n + '.alpha')).all()
                           for n in names):  # back to its start: round to nearest once saved
                    for n in names:
                        utils.set_variable_data(self._scope, self._place, n + '.alpha', initial[n])
                    logger.warning('Reconstruction: region %d of %d (%s) diverged (its '
                                   'rounding became NaN); its weights keep round-to-nearest',
                                   k + 1, len(self._regions), ', '.join(names))
                _log_region(k + 1, len(self._regions), time.monotonic() - began)
            if self._weight_quantize_type == 'channel_wise_abs_max':
                self._update_scale()
            self._update_weights_to_int()
            if self._bias_correction:
                self._bias_correction_w()
            return self._program, self._scale_dict
    return RegionByRegion


# ops whose gradient reads the input's shape from an XShape output, which an inference model's
# ops no longer have (SegFormer's attention transposes and reshapes)
XSHAPE_OPS = ('transpose2', 'reshape2', 'squeeze2', 'unsqueeze2', 'flatten2',
              'flatten_contiguous_range')


def _restore_xshapes(block: Any) -> None:
    """Gives each such op of `block` its XShape output back ((0, *input shape), as Paddle's
    training programs have it), so that a region's backward can be built through it."""
    for op in block.ops:
        if op.type in XSHAPE_OPS and not ('XShape' in op.desc.output_names()
                                          and op.desc.output('XShape')):
            x = block.var(op.input('X')[0])
            xshape = block.create_var(name=op.output('Out')[0] + '.xshape', dtype=x.dtype,
                                      shape=[0] + list(x.shape), stop_gradient=True)
            op.desc.set_output('XShape', [xshape.name])


def _indexed_regions(base: Any) -> Any:
    """PaddleSlim's RegionBuilder with its graph's pre_ops and next_ops answered from maps of
    each variable's producers and consumers: the same lists (order and repeats included) as
    GraphWrapper's scans of every op, which make region building cubic in the op count."""
    class Indexed(base):
        def _init_depth(self) -> None:  # the first user of the graph's queries
            graph, program = self._graph, self._program
            ops = graph.ops()
            known = {name for block in program.blocks for name in block.vars}
            producers: Dict[str, List[Any]] = {}
            consumers: Dict[str, List[Any]] = {}
            lost_out, lost_in = [], []   # ops with an output / input missing from the blocks
            for op in ops:
                outs, ins = op._op.output_arg_names, op._op.input_arg_names
                for name in dict.fromkeys(n for n in outs if n in known):
                    producers.setdefault(name, []).append(op)
                if any(n not in known for n in outs):
                    lost_out.append(op)
                if ins and ins[0] in known:  # next_ops skips ops whose first input is missing
                    for name in dict.fromkeys(n for n in ins if n in known):
                        consumers.setdefault(name, []).append(op)
                    if any(n not in known for n in ins):
                        lost_in.append(op)

            def linked(op: Any, names: Sequence[str], by_name: Dict[str, List[Any]],
                       lost: List[Any]) -> List[Any]:
                count: Dict[int, int] = {}
                found: Dict[int, Any] = {}
                for name in names:
                    for other in (by_name.get(name, []) if name in known else lost):
                        if other.idx() != op.idx():
                            count[other.idx()] = count.get(other.idx(), 0) + 1
                            found[other.idx()] = other
                return [found[i] for i in sorted(count) for _ in range(count[i])]

            graph.next_ops = lambda op: linked(op, op._op.output_arg_names, consumers, lost_in)
            graph.pre_ops = lambda op: linked(op, op._op.input_arg_names, producers, lost_out)
            super()._init_depth()
    return Indexed


def _log_region(done: int, total: int, seconds: float) -> None:
    """Reconstruction's progress: a deep model takes many minutes, region after region."""
    if done == total or done % max(1, total // 10) == 0:
        logger.info('Reconstruction: %d of %d regions learned in %.0f s (about %.0f s to go)',
                    done, total, seconds, seconds / done * (total - done))
