"""Decoders that compute PaddleSeg's function with fewer operations, on the same parameters
(checkpoints load and save as PaddleSeg's do).

SegFormer's MLP decoder projects each of the four backbone stages to `embedding_dim` channels (a
Linear on the flattened, transposed features), transposes back, resizes the three coarse stages
to the finest stage's size, concatenates the four and mixes them with a 1x1 conv (ConvBNReLU).
Every step before the batch norm is linear, and bilinear resizing keeps constants, so the conv
over the concat equals the sum over the stages of resize(conv_i(stage_i)), where conv_i is the
1x1 conv whose weight is the fuse conv's slice for the stage times the stage's Linear (and whose
bias carries the Linear's bias). That sum skips the concat of 4 x embedding_dim channels at a
quarter of the input's size, the 1x1 conv over it (4.3 G multiply-adds for SegFormer-B0 at
512x512, 44 % of its FP32 time on OpenVINO with the reorder of its input) and the transposes
around the Linears. In training and evaluation the composed weights are computed from the
parameters at each step (a few small matmuls), so training updates PaddleSeg's parameters; an
export (`frozen_decoder`) holds them as constants of plain convs. In a QAT model each stage's
input is rounded on the range its Linear's quantizer observes and the composed weight per
output channel as the fuse conv's is, in training and in the INT8 export alike."""
import contextlib
import copy
from typing import Any, Iterator, List

from paddleseg.models.segformer import SegFormer

from segslim._paddle import paddle

F = paddle.nn.functional


def _inner(layer: Any) -> Any:
    """The layer under QAT's output-scale wrapper (which holds it as _layer): a Conv2D or
    Linear, or QAT's QuantizedConv2D or QuantizedLinear."""
    while hasattr(layer, '_layer'):
        layer = layer._layer
    return layer


def _param(layer: Any, name: str) -> Any:
    return getattr(_inner(layer), name)


def _quantized(fuse: Any, proj: Any) -> bool:
    """Whether QAT quantizes the stage: its Linear's input and the fuse conv's weights (a
    quant_config that skips either leaves the stage conv float)."""
    return hasattr(proj, '_fake_quant_input') and hasattr(fuse, '_fake_quant_weight')


def _stage_weights(model: Any, index: int, mlp: Any) -> List[Any]:
    """[weight, bias] of stage `index`'s 1x1 conv (the fuse conv's input channels hold the
    stages in the order c4, c3, c2, c1)."""
    fuse_weight = _param(model.linear_fuse._conv, 'weight')
    dim = fuse_weight.shape[0]
    mix = fuse_weight[:, index * dim:(index + 1) * dim, 0, 0]  # [embedding, embedding]
    weight = paddle.matmul(mix, _param(mlp.proj, 'weight'), transpose_y=True)  # [emb, stage]
    bias = paddle.matmul(mix, _param(mlp.proj, 'bias').unsqueeze(1)).squeeze(1)
    return [weight.unsqueeze([2, 3]), bias]


# Each stage: its Linear, its slice of the fuse conv's input channels (PaddleSeg concatenates
# c4, c3, c2, c1) and its place among the backbone's outputs (c1, c2, c3, c4).
STAGES = (('linear_c4', 0, 3), ('linear_c3', 1, 2), ('linear_c2', 2, 1), ('linear_c1', 3, 0))


def _summed_stage(model: Any, index: int, mlp: Any, feat: Any) -> Any:
    """The stage's share of the fuse conv's output: its 1x1 conv with the composed weight,
    or the frozen conv of an export."""
    frozen = getattr(model, '_frozen_stages', None)
    if frozen is not None:
        return frozen[index](feat)
    weight, bias = _stage_weights(model, index, mlp)
    fuse, proj = _inner(model.linear_fuse._conv), _inner(mlp.proj)
    if _quantized(fuse, proj):  # QAT: rounded as the INT8 export rounds them
        feat = proj._fake_quant_input(feat)  # the stage's range, which the Linear observed
        weight = fuse._fake_quant_weight(weight)  # per output channel, as the fuse conv's
    return F.conv2d(feat, weight, bias=bias)


def summed_segformer_forward(self: Any, x: Any) -> Any:
    """SegFormer.forward (PaddleSeg 2.8) with the decoder's concat and fuse conv summed per
    stage; the same output up to float rounding."""
    feats = self.backbone(x)
    size = paddle.shape(feats[0])[2:]
    parts = []
    for name, index, place in STAGES:
        part = _summed_stage(self, index, getattr(self, name), feats[place])
        if place:  # a coarse stage, resized to the finest one's size
            part = F.interpolate(part, size=size, mode='bilinear',
                                 align_corners=self.align_corners)
        parts.append(part)
    out = parts[0] + parts[1] + parts[2] + parts[3]
    fuse = self.linear_fuse
    out = fuse._relu(fuse._batch_norm(out))
    logit = self.linear_pred(self.dropout(out))
    return [F.interpolate(logit, size=paddle.shape(x)[2:], mode='bilinear',
                          align_corners=self.align_corners)]


class SummedSegFormer(SegFormer):
    """PaddleSeg's SegFormer whose decoder sums per-stage convs; parameters as SegFormer's."""
    forward = summed_segformer_forward


def with_fast_decoder(model: Any) -> Any:
    """`model` with the summed decoder when it is PaddleSeg's SegFormer (its class becomes
    SummedSegFormer, which only changes forward); any other model as it is."""
    if type(model) is SegFormer:
        model.__class__ = SummedSegFormer
    return model


@contextlib.contextmanager
def frozen_decoder(model: Any) -> Iterator[None]:
    """While it lasts, a SummedSegFormer's stage convs are plain Conv2D layers holding the
    composed weights as constants (what an export saves: no matmuls on parameters, which
    Paddle Inference's INT8 passes and PaddleSlim's PTQ would take for layers); other models
    are left as they are. The layers are gone afterwards, so checkpoints keep PaddleSeg's
    keys."""
    if not isinstance(model, SummedSegFormer):
        yield
        return
    convs = []
    fuse = _inner(model.linear_fuse._conv)
    with paddle.no_grad():
        for name, index, _ in STAGES:
            mlp = getattr(model, name)
            weight, bias = _stage_weights(model, index, mlp)
            conv = paddle.nn.Conv2D(weight.shape[1], weight.shape[0], 1)
            conv.weight.set_value(weight)
            conv.bias.set_value(bias)
            proj = _inner(mlp.proj)
            if _quantized(fuse, proj):
                # a QAT model: the fuse conv's quantized layer (per-channel weights) with
                # this stage's weights, and the stage's input range its Linear observed
                quantized = copy.deepcopy(fuse)
                quantized.weight, quantized.bias = conv.weight, conv.bias
                quantized._fake_quant_input = copy.deepcopy(proj._fake_quant_input)
                conv = quantized
            convs.append(conv)
    model._frozen_stages = paddle.nn.LayerList(convs)
    try:
        yield
    finally:
        del model._frozen_stages
