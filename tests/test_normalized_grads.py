"""param.grad * lr_multiplier equals the hand-derived normalized gradient Grad_i of §1.1.

Reference: the numpy float64 network of ``numpy_mf.py`` (no torch, no autograd).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy_mf import NumpyMF

from mflightning import MeanFieldMLP, Normal
from mflightning.losses import mean_field_loss

CASES = [
    # widths, activations, bias, loss
    ([40, 30], ["relu", "tanh", "identity"], False, "half_mse"),
    ([40, 30], ["tanh", "relu", "tanh"], True, "mse"),
    ([40, 30, 20], ["relu", "tanh", "tanh", "identity"], False, "mse"),
    ([40, 30, 20], ["tanh", "relu", "identity", "tanh"], True, "half_mse"),
]


@pytest.mark.parametrize(("widths", "activations", "bias", "loss"), CASES)
def test_normalized_gradients_match_numpy_reference(
    widths: list[int], activations: list[str], bias: bool, loss: str
) -> None:
    depth = len(widths) + 1
    laws = [Normal(0.2, 1.0)] + [Normal(1.0, 0.5)] * (depth - 2) + [Normal(0.5, 1.0)]
    net = MeanFieldMLP(
        7,
        widths,
        activations=activations,
        init=laws,
        bias=bias,
        bias_init=Normal(0.1, 0.3),
        generator=torch.Generator().manual_seed(0),
    )
    net = net.double()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(25, 7))
    y = np.sign(rng.normal(size=25))

    mean_field_loss(loss, net(torch.from_numpy(x)), torch.from_numpy(y)).backward()

    # numpy layout: w_1 (n1, d), w_i (n_{i-1}, n_i) -- the transpose of torch's (out, in)
    weights = [net.layers[0].weight.detach().numpy().copy()]
    weights += [layer.weight.detach().numpy().T.copy() for layer in net.layers[1:]]
    biases = [layer.bias.detach().numpy().copy() for layer in net.layers] if bias else None
    reference = NumpyMF(weights, activations, biases)
    grads, bias_grads = reference.grads(x, y, loss)

    for i, layer in enumerate(net.layers):
        normalized = (layer.weight.grad * layer.lr_multiplier).numpy()
        expected = grads[i] if i == 0 else grads[i].T
        np.testing.assert_allclose(normalized, expected, rtol=1e-10, atol=1e-12)
        if bias:
            normalized_bias = (layer.bias.grad * layer.bias_lr_multiplier).numpy()
            np.testing.assert_allclose(normalized_bias, bias_grads[i], rtol=1e-10, atol=1e-12)
