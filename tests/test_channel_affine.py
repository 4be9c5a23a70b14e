"""Per-channel affine steps in paddle's batch-norm kernel, and convolution biases through it."""
import numpy as np
import pytest


def _conv_step(conv, functional, x, upstream):
    from segslim._paddle import paddle
    xi = x.clone()
    xi.stop_gradient = False
    conv.clear_gradients()
    if functional:  # as QAT's quantized convolutions call it
        y = paddle.nn.functional.conv2d(xi, conv.weight, bias=conv.bias, padding=1,
                                        groups=conv._groups)
    else:
        y = conv(xi)
    (y * upstream).sum().backward()
    return [y.numpy(), xi.grad.numpy(), conv.weight.grad.numpy(), conv.bias.grad.numpy()]


@pytest.mark.parametrize('functional', [False, True])
@pytest.mark.parametrize('groups', [1, 4])  # conv2d and depthwise_conv2d
def test_conv_bias_through_batch_norm_kernel_is_the_add(groups, functional, monkeypatch):
    """Inside the context a convolution adds its bias in the batch-norm kernel, with the same
    output and the same gradients up to the order of the bias sum; outside it paddle's own
    add is back."""
    from segslim._paddle import paddle
    from segslim.train import channel_affine
    from segslim.train.channel_affine import conv_bias_in_batch_norm_kernel
    calls = []
    affine = channel_affine.affine
    monkeypatch.setattr(channel_affine, 'affine', lambda *a: calls.append(a) or affine(*a))
    paddle.seed(0)
    conv = paddle.nn.Conv2D(4, 4, 3, padding=1, groups=groups)
    conv.bias.set_value(paddle.randn([4]))
    x, upstream = paddle.randn([2, 4, 9, 7]), paddle.randn([2, 4, 9, 7])
    originals = (paddle.nn.functional.conv._conv_nd, paddle.nn.functional.conv2d)
    expected = _conv_step(conv, functional, x, upstream)
    with conv_bias_in_batch_norm_kernel():
        assert paddle.nn.functional.conv2d is not originals[1]
        with conv_bias_in_batch_norm_kernel():  # nested
            got = _conv_step(conv, functional, x, upstream)
        assert len(calls) == 1
        assert paddle.nn.functional.conv._conv_nd is not originals[0]
    assert (paddle.nn.functional.conv._conv_nd, paddle.nn.functional.conv2d) == originals
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    np.testing.assert_allclose(got[3], expected[3], rtol=1e-5, atol=1e-5)


def test_affine_scales_and_shifts_each_channel():
    from segslim._paddle import paddle
    from segslim.train.channel_affine import affine
    x = paddle.randn([2, 3, 4, 5])
    scale, shift = paddle.to_tensor([2.0, -1.0, 0.5]), paddle.to_tensor([1.0, 0.0, -3.0])
    expected = x.numpy() * scale.numpy()[:, None, None] + shift.numpy()[:, None, None]
    np.testing.assert_allclose(affine(x, scale, shift).numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(affine(x).numpy(), x.numpy())


def test_conv_nd_called_with_keywords_keeps_its_arguments():
    from segslim._paddle import paddle
    from segslim.train.channel_affine import conv_bias_in_batch_norm_kernel
    conv_module = paddle.nn.functional.conv
    x, w, b = paddle.randn([1, 2, 5, 5]), paddle.randn([3, 2, 3, 3]), paddle.randn([3])
    geometry = dict(stride=[1, 1], padding=[1, 1], padding_algorithm='EXPLICIT',
                    dilation=[1, 1])
    expected = conv_module._conv_nd(x, w, bias=b, **geometry).numpy()
    with conv_bias_in_batch_norm_kernel():
        got = conv_module._conv_nd(x, w, bias=b, **geometry).numpy()
        no_bias = conv_module._conv_nd(x, w, **geometry).numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(no_bias + b.numpy()[:, None, None], expected, rtol=1e-6,
                               atol=1e-6)
