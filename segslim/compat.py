"""What the Paddle 3 line changes under PaddleSeg 2.8 and PaddleSlim 2.6, worked around in
segslim (installed packages are never edited). Nothing here runs on the 2.6 line.

- Paddle 3 writes `paddle.jit.save` programs in its new IR (`model.json`); PaddleSlim's QAT
  export, Paddle Inference's oneDNN INT8 passes and our program rewrites read the
  ProgramDesc format (`model.pdmodel`). FLAGS_enable_pir_api=0, set before paddle is
  imported (segslim/__init__), keeps the ProgramDesc format; a value the user set wins.
- Paddle 3 refuses arithmetic between float and integer tensors, which PaddleSeg 2.8's
  CrossEntropyLoss does when it averages (an int64 `ones_like(label)` times the float pixel
  mask): its post-processing is replaced by one that keeps every factor float.
- Paddle 3 builds some ops (sigmoid, matmul, bmm, maximum, logical_and, a few unary math
  ops) only for its new IR or dygraph, so translating a model to a ProgramDesc
  (`paddle.jit.save`) fails on them ("argument must be Value, but got Variable"): with a
  ProgramDesc Variable as input they now append the ProgramDesc op of the same meaning.
- Paddle Inference 3 renamed its oneDNN passes from `*_mkldnn_*` to `*_onednn_*`."""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

PIR_FLAG = 'FLAGS_enable_pir_api'


def paddle_major(version: str) -> int:
    """The major version of a paddle version string; 0.0.0 (a develop build) counts as new."""
    head = version.split('.', 1)[0]
    major = int(head) if head.isdigit() else 0
    return 99 if version.startswith('0.0.0') else major


def installed_paddle_version() -> Optional[str]:
    """The installed paddlepaddle's version from its package metadata (paddle not imported)."""
    from importlib import metadata
    for name in ('paddlepaddle', 'paddlepaddle-gpu'):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_versions(names: Sequence[str]) -> Dict[str, str]:
    """{'python': ..., name: version} for the `names` that are installed (paddlepaddle
    stands for paddlepaddle-gpu too), read from package metadata."""
    import platform
    from importlib import metadata
    found = {'python': platform.python_version()}
    for name in names:
        for dist in ((name, name + '-gpu') if name == 'paddlepaddle' else (name,)):
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


# what made a model folder, and what ran a benchmark (deploy.yaml and report `versions`)
MODEL_STACK = ('paddlepaddle', 'paddleslim', 'paddleseg', 'segslim')
ENGINE_STACK = MODEL_STACK + ('openvino', 'nncf', 'onnxruntime', 'paddle2onnx')


def set_program_format(environ: Any, version: Optional[str]) -> None:
    """Before paddle's import: ProgramDesc programs on Paddle 3 (see the module text).
    `version` is the installed paddle's, None when it cannot be read (then nothing is set)."""
    if version and paddle_major(version) >= 3:
        environ.setdefault(PIR_FLAG, '0')


def _float_post_process(self: Any, logit: Any, label: Any, semantic_weights: Any,
                        loss: Any) -> Any:
    """PaddleSeg 2.8's CrossEntropyLoss average (mean loss over the mean weight of the
    counted pixels; the top-k share of pixels when top_k_percent_pixels < 1) with the class
    weights looked up in float."""
    import paddle
    import paddle.nn.functional as F
    if self.avg_non_ignore:
        mask = paddle.cast(label != self.ignore_index, dtype='float32')
    else:
        mask = paddle.ones(label.shape, dtype='float32')
    mask.stop_gradient = True
    label.stop_gradient = True
    if loss.ndim > mask.ndim:
        loss = paddle.squeeze(loss, axis=-1)
    loss = loss * mask
    if semantic_weights is not None:
        loss = loss * semantic_weights
    if self.weight is not None:
        counted = label * paddle.cast(mask, label.dtype)
        coef = paddle.sum(F.one_hot(counted, logit.shape[-1]) * self.weight, axis=-1)
    else:
        coef = paddle.ones(label.shape, dtype='float32')
    if self.top_k_percent_pixels == 1.0:
        return paddle.mean(loss) / (paddle.mean(mask * coef) + self.EPS)
    loss = loss.reshape((-1, ))
    loss, indices = paddle.topk(loss, int(self.top_k_percent_pixels * loss.numel()))
    coef = paddle.gather(coef.reshape((-1, )), indices)
    coef.stop_gradient = True
    return loss.mean() / (paddle.mean(coef) + self.EPS)


def patch_paddleseg(version: str) -> None:
    """After paddleseg's import, on Paddle 3: the float CrossEntropyLoss average."""
    if paddle_major(version) < 3:
        return
    from paddleseg.models.losses.cross_entropy_loss import CrossEntropyLoss
    CrossEntropyLoss._post_process_loss = _float_post_process


# _C_ops name: (ProgramDesc op, input slots, attributes from the remaining arguments)
_Attrs = Callable[..., Dict[str, Any]]
LEGACY_OPS: Dict[str, Tuple[str, Sequence[str], Optional[_Attrs]]] = {
    'matmul': ('matmul_v2', ('X', 'Y'),
               lambda trans_x=False, trans_y=False: {'trans_x': trans_x, 'trans_y': trans_y}),
    'bmm': ('bmm', ('X', 'Y'), None),
    'maximum': ('elementwise_max', ('X', 'Y'), lambda: {'axis': -1}),
    'logical_and': ('logical_and', ('X', 'Y'), None),
    **{name: (name, ('X',), None)
       for name in ('sigmoid', 'sqrt', 'rsqrt', 'log', 'sin', 'cos', 'floor', 'sign')},
}


def _legacy_op(original: Callable[..., Any], op: str, slots: Sequence[str],
               attrs: Optional[_Attrs]) -> Callable[..., Any]:
    from paddle.base.framework import Variable, in_dygraph_mode
    from paddle.base.layer_helper import LayerHelper

    def call(*args: Any, **kwargs: Any) -> Any:
        # (in dygraph, isinstance(tensor, Variable) holds for every tensor)
        if in_dygraph_mode() or kwargs or not args or not isinstance(args[0], Variable):
            return original(*args, **kwargs)
        helper = LayerHelper(op)
        out = helper.create_variable_for_type_inference(dtype=args[0].dtype)
        helper.append_op(type=op, inputs={slot: [a] for slot, a in zip(slots, args)},
                         outputs={'Out': [out]},
                         attrs=attrs(*args[len(slots):]) if attrs else {})
        return out
    call.__wrapped__ = original  # type: ignore[attr-defined]
    return call


def patch_paddle(version: str) -> None:
    """After paddle's import, on Paddle 3: the ProgramDesc ops of LEGACY_OPS."""
    if paddle_major(version) < 3:
        return
    from paddle import _C_ops
    for name, (op, slots, attrs) in LEGACY_OPS.items():
        original = getattr(_C_ops, name, None)
        if original is not None and not hasattr(original, '__wrapped__'):
            setattr(_C_ops, name, _legacy_op(original, op, slots, attrs))


def pass_name(name: str, version: str) -> str:
    """A Paddle Inference pass name as this paddle spells it (see the module text)."""
    return name.replace('_mkldnn_', '_onednn_') if paddle_major(version) >= 3 else name
