"""`paddle_glm.linear`: the CPU bias gradient as a matrix-vector product gives `nn.Linear`'s gradients."""
import numpy as np
import paddle
import paddle.nn as nn

from paddle_glm.linear import Linear


def twin_layers(bias_trainable: bool = True):
    paddle.seed(3)
    ours = Linear(16, 24)
    plain = nn.Linear(16, 24)
    plain.set_state_dict(ours.state_dict())
    for layer in (ours, plain):
        layer.bias.stop_gradient = not bias_trainable
    return ours, plain


def gradients(layer: nn.Layer, x: np.ndarray, upstream: np.ndarray):
    inputs = paddle.to_tensor(x, stop_gradient=False)
    output = layer(inputs)
    (output * paddle.to_tensor(upstream)).sum().backward()
    grads = [inputs.grad.numpy(), layer.weight.grad.numpy()]
    if not layer.bias.stop_gradient:
        grads.append(layer.bias.grad.numpy())
    return output.numpy(), grads


def test_outputs_and_gradients_equal_nn_linear():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16)).astype("float32")  # [batch, length, features]: rows flattened for the bias
    upstream = rng.standard_normal((3, 5, 24)).astype("float32")
    ours, plain = twin_layers()
    (out, grads), (expected_out, expected) = gradients(ours, x, upstream), gradients(plain, x, upstream)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(expected) == 3
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[2], upstream.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)  # by hand


def test_a_frozen_bias_and_no_grad_take_paddles_path():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16)).astype("float32")
    upstream = rng.standard_normal((4, 24)).astype("float32")
    ours, plain = twin_layers(bias_trainable=False)
    (_, grads), (_, expected) = gradients(ours, x, upstream), gradients(plain, x, upstream)
    assert len(grads) == 2 and ours.bias.grad is None
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with paddle.no_grad():
        np.testing.assert_allclose(ours(paddle.to_tensor(x)).numpy(), plain(paddle.to_tensor(x)).numpy(), rtol=1e-6)


def test_a_whole_model_trains_with_the_gradients_of_paddles_path(monkeypatch):
    """Residual branches share upstream gradients: the layer's pass-through gradient must not alias them."""
    from conftest import tiny_config
    from paddle_glm import linear
    from paddle_glm.models.glm import GLMForConditionalGeneration

    rng = np.random.default_rng(2)
    ids = paddle.to_tensor(rng.integers(0, 96, (2, 12)))
    labels = paddle.to_tensor(rng.integers(0, 96, (2, 12)))

    def grads():
        paddle.seed(4)
        model = GLMForConditionalGeneration(tiny_config())
        model.train()
        model(ids, labels=labels).loss.backward()
        return {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}

    calls = []
    apply = linear._AddBias.apply
    monkeypatch.setattr(linear._AddBias, "apply", lambda *args: calls.append(1) or apply(*args))
    ours = grads()
    assert len(calls) == 8  # 2 layers x (QKV, dense, h->4h, 4h->h): the matrix-vector bias gradient ran
    monkeypatch.setattr(linear, "_fast_bias_grad", lambda x, bias: False)
    plain = grads()
    assert len(calls) == 8 and sum(name.endswith(".bias") for name in ours) >= 8 and ours.keys() == plain.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], plain[name], rtol=1e-4, atol=1e-6, err_msg=name)
