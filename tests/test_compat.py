"""The Paddle 3 workarounds (segslim.compat): they change nothing on the 2.6 line, and the
float CrossEntropyLoss average equals PaddleSeg's own wherever PaddleSeg's runs."""
import sys

import numpy as np
import pytest

from segslim import compat
from segslim._paddle import paddle


def test_versions_and_pass_names():
    assert compat.paddle_major('2.6.2') == 2 and compat.paddle_major('3.2.2') == 3
    assert compat.paddle_major('0.0.0') >= 3  # a develop build is the newest
    assert compat.pass_name('interpolate_mkldnn_pass', '2.6.2') == 'interpolate_mkldnn_pass'
    assert compat.pass_name('interpolate_mkldnn_pass', '3.2.2') == 'interpolate_onednn_pass'
    env = {}
    compat.set_program_format(env, '2.6.2')
    assert env == {}
    compat.set_program_format(env, '3.2.2')
    assert env == {compat.PIR_FLAG: '0'}
    env = {compat.PIR_FLAG: '1'}  # the user's value wins
    compat.set_program_format(env, '3.2.2')
    assert env == {compat.PIR_FLAG: '1'}


@pytest.mark.skipif(compat.paddle_major(paddle.__version__) >= 3,
                    reason="PaddleSeg's own average fails on Paddle 3 (what compat replaces)")
@pytest.mark.parametrize('weight, top_k, avg_non_ignore', [
    (None, 1.0, True), (None, 1.0, False), ([0.3, 1.0, 2.0], 1.0, True),
    ([0.3, 1.0, 2.0], 0.25, True), (None, 0.5, False)])
def test_float_average_equals_paddleseg(weight, top_k, avg_non_ignore):
    from paddleseg.models.losses.cross_entropy_loss import CrossEntropyLoss
    rng = np.random.default_rng(0)
    logit = paddle.to_tensor(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    labels = rng.integers(0, 3, (2, 8, 8))
    labels[0, :2] = 255
    loss = CrossEntropyLoss(weight=weight, top_k_percent_pixels=top_k,
                            avg_non_ignore=avg_non_ignore)
    theirs = loss(logit, paddle.to_tensor(labels)).numpy()
    patched = CrossEntropyLoss._post_process_loss
    try:
        CrossEntropyLoss._post_process_loss = compat._float_post_process
        ours = loss(logit, paddle.to_tensor(labels)).numpy()
    finally:
        CrossEntropyLoss._post_process_loss = patched
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_legacy_ops_append_programdesc_ops_and_leave_dygraph_alone():
    calls = []

    def original(*args, **kwargs):
        calls.append(args)
        return 'dygraph'
    sigmoid = compat._legacy_op(original, 'sigmoid', ('X',), None)
    matmul = compat._legacy_op(original, *compat.LEGACY_OPS['matmul'])
    assert sigmoid(paddle.ones([2])) == 'dygraph' and len(calls) == 1
    main = paddle.static.Program()
    paddle.enable_static()
    try:
        with paddle.static.program_guard(main):
            x = paddle.static.data('x', [2, 3], 'float32')
            y = paddle.static.data('y', [4, 3], 'float32')
            sigmoid(x)
            out = matmul(x, y, False, True)
    finally:
        paddle.disable_static()
    ops = [(op.type, op.attr('trans_y') if op.type == 'matmul_v2' else None)
           for op in main.global_block().ops]
    assert ops == [('sigmoid', None), ('matmul_v2', True)] and len(calls) == 1
    assert out.dtype == x.dtype


def test_onnx_export_without_paddle2onnx_names_the_python_it_has_no_wheel_for(monkeypatch):
    from segslim.errors import UserError
    from segslim.onnx.export import require_onnx_export
    monkeypatch.setitem(sys.modules, 'paddle2onnx', None)  # an import of it fails
    with pytest.raises(UserError, match=r'no wheel for Python 3\.13 .*Python 3\.12 environment'):
        require_onnx_export(python=(3, 13))
    with pytest.raises(UserError, match=r'needs the paddle2onnx package: pip install'):
        require_onnx_export(python=(3, 12))
