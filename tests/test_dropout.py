"""`paddle_glm.dropout.Dropout` on CPU: nn.Dropout's semantics with NumPy-drawn masks, seeded by Paddle."""
import numpy as np
import paddle
import paddle.nn as nn

from paddle_glm.dropout import Dropout


def dropped(p: float, shape=(64, 128, 128), seed: int = 0):
    paddle.seed(seed)
    layer = Dropout(p)
    layer.train()
    x = paddle.ones(list(shape))
    x.stop_gradient = False
    out = layer(x)
    (out * 3.0).sum().backward()
    return out.numpy(), x.grad.numpy()


def test_drops_a_share_p_and_scales_the_rest_like_nn_dropout():
    for p in (0.1, 0.5):
        out, _ = dropped(p)
        share = float((out == 0).mean())
        sd = (p * (1 - p) / out.size) ** 0.5  # binomial: 1M elements
        assert abs(share - p) < 5 * sd + 1e-5, (p, share)
        np.testing.assert_allclose(np.unique(out), [0.0, 1.0 / (1.0 - p)], rtol=1e-6)
        reference = nn.functional.dropout(paddle.ones([1024, 1024]), p).numpy()  # Paddle's own: same two values
        np.testing.assert_allclose(np.unique(reference), np.unique(out), rtol=1e-6)


def test_the_gradient_passes_through_the_forward_mask_only():
    out, grad = dropped(0.3)
    np.testing.assert_allclose(grad, 3.0 * out, rtol=1e-6)  # d(3 * x * mask / (1 - p)) / dx, with x = 1


def test_masks_follow_paddles_seed_and_generator_state():
    first, _ = dropped(0.1, seed=5)
    again, _ = dropped(0.1, seed=5)
    other, _ = dropped(0.1, seed=6)
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.1
    paddle.seed(5)
    state = paddle.get_rng_state()
    layer = Dropout(0.1)
    x = paddle.ones([256, 256])
    layer(x)  # advances Paddle's generator: the next call draws a new mask ...
    second = layer(x).numpy()
    paddle.set_rng_state(state)  # ... and a restored state (a resumed run) draws the same masks again
    layer(x)
    np.testing.assert_array_equal(layer(x).numpy(), second)


def test_evaluation_and_p_zero_leave_the_input_alone():
    x = paddle.rand([8, 8])
    layer = Dropout(0.5)
    layer.eval()
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
    zero = Dropout(0.0)
    np.testing.assert_array_equal(zero(x).numpy(), x.numpy())
