"""The argmax head of a converted OpenVINO model: the TopK over the classes (and the resize
of the logits before it) on a planar layout where that is faster."""
from typing import Any, List, Optional, Tuple

import numpy as np


def planar_channel_topk(model: Any, max_channels: int) -> int:
    """Runs each TopK over the channels of a 4-D tensor (the export's argmax head) with
    fewer than `max_channels` channels on the tensor reshaped to N x C x H*W, and reshapes
    its outputs back: the same values and indices. A 4-D TopK follows its producer's layout,
    and after INT8 layers that is blocked or channels-last, where the plugin's TopK over two
    classes at 512x512 runs several times slower than the reorder to a planar layout that
    the 3-D input gets. With a channel block or more (16 float32 channels with AVX-512, so
    Cityscapes' 19 classes) it is the other way round: that reorder costs 2-3x the TopK it
    saves. When the TopK's input is a resize over height and width read by nothing else (the
    logits upsampled to the image), the resize runs on the N*C x h x w logits too
    (_planar_resize), so it writes the planar tensor the TopK reads instead of a blocked
    one padded to the channel block. Returns how many TopK ops changed."""
    import openvino.opset13 as ops
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != 'TopK':
            continue
        rank = op.get_input_partial_shape(0).rank
        if not rank.is_static or rank.get_length() != 4:
            continue
        attrs = op.get_attributes()
        channels = op.get_input_partial_shape(0)[1]
        if attrs['axis'] not in (1, -3) or not channels.is_static or \
                channels.get_length() >= max_channels:
            continue
        targets = [list(op.output(i).get_target_inputs()) for i in range(2)]
        k = op.input_value(1)
        planar = _planar_resize(op.input_value(0))
        if planar is None:
            data = op.input_value(0)
            flat = ops.reshape(data, ops.constant(np.array([0, 0, -1], np.int64)), True)
            shape = ops.shape_of(data, 'i64')
            batch, height_width = _gather(shape, [0]), _gather(shape, [2, 3])
        else:
            flat, batch, height_width = planar
        topk = ops.topk(flat, k, 1, attrs['mode'], attrs['sort'], attrs['index_element_type'],
                        bool(attrs.get('stable', False)))
        # N, k, H, W of the original output, whatever the input shape is at run time
        out_shape = ops.concat([
            batch, ops.convert(ops.reshape(k, ops.constant(np.array([1], np.int64)), False),
                               'i64'), height_width], 0)
        for i, consumers in enumerate(targets):
            back = ops.reshape(topk.output(i), out_shape, False)
            for target in consumers:
                target.replace_source_output(back.output(0))
        done += 1
    if done:
        model.validate_nodes_and_infer_types()
    return done


def _gather(shape: Any, index: List[int]) -> Any:
    import openvino.opset13 as ops
    return ops.gather(shape, ops.constant(np.array(index, np.int64)), 0)


def _planar_resize(resized: Any) -> Optional[Tuple[Any, Any, Any]]:
    """For `resized`, the output of an Interpolate over the last two axes of a N,C,h,w tensor
    with no padding that nothing but the TopK reads: the same resize run on the input
    reshaped to N*C x h x w, reshaped to N x C x H*W, with N and H,W as 1-D i64 tensors.
    Each of the N*C planes is resized on its own either way, so the values are the same. The
    plugin runs this 3-D resize on a planar layout: a 2-class 64 -> 512 head (resize and
    TopK) took 0.8-1.2 ms instead of 4-6 ms (docs/measurements.md). None for any other
    producer."""
    import openvino.opset13 as ops
    node = resized.get_node()
    if node.get_type_name() != 'Interpolate' or len(resized.get_target_inputs()) != 1:
        return None
    attrs = node.get_attributes()
    if any(attrs['pads_begin']) or any(attrs['pads_end']) or \
            node.get_input_partial_shape(0)[1] != node.get_output_partial_shape(0)[1]:
        return None
    # v4: data, sizes, scales[, axes]; v11: data, sizes or scales[, axes]
    v4 = node.get_type_info().version_id == 'opset4'
    target = node.input_value(2 if v4 and attrs['shape_calculation_mode'] == 'scales' else 1)
    axes_at = 3 if v4 else 2
    if node.get_input_size() > axes_at:
        axes = node.input_value(axes_at).get_node()
        if axes.get_type_name() != 'Constant' or \
                [int(a) % 4 for a in axes.get_data().reshape(-1)] != [2, 3]:
            return None
    elif target.get_partial_shape().rank.is_static and target.get_partial_shape()[0] == 4:
        target = _gather(target, [2, 3])
    else:
        return None
    data = node.input_value(0)  # 4-D: the TopK reads its output
    shape = ops.shape_of(data, 'i64')
    planes = ops.reshape(data, ops.concat([ops.constant(np.array([-1], np.int64)),
                                           _gather(shape, [2, 3])], 0), False)
    up = ops.interpolate(planes, target, attrs['mode'], attrs['shape_calculation_mode'],
                         [0, 0, 0], [0, 0, 0], attrs['coordinate_transformation_mode'],
                         attrs['nearest_mode'], attrs['antialias'], attrs['cube_coeff'],
                         ops.constant(np.array([1, 2], np.int64)))
    batch = _gather(shape, [0])
    flat = ops.reshape(up, ops.concat([batch, _gather(shape, [1]),
                                       ops.constant(np.array([-1], np.int64))], 0), False)
    return flat, batch, _gather(ops.shape_of(up, 'i64'), [1, 2])
