"""Independent numpy float64 reference of the finite MF network of docs/theory.md §1.1.

No torch, no autograd: forward H_i, normalized backward Delta_i and normalized gradients Grad_i are
written out with einsum in Nguyen–Pham index order,

    w_1[j1, :]  in R^d,     w_i[j_{i-1}, j_i]  (2 <= i <= L, with n_L = 1),     b_i[j_i],

    H_1 = <w_1(j1), x> + b_1,
    H_i = (1/n_{i-1}) sum_{j_{i-1}} w_i(j_{i-1}, j_i) phi_{i-1}(H_{i-1}) + b_i,
    Delta_L = d2Loss * phi_L'(H_L),
    Delta_i = phi_i'(H_i) (1/n_{i+1}) sum_{j_{i+1}} w_{i+1}(j_i, j_{i+1}) Delta_{i+1},
    Grad_1 = Delta_1 x,   Grad_i = Delta_i phi_{i-1}(H_{i-1}),   Grad_i^b = Delta_i,

and one full-batch step is ``w <- w - lr * mean_z Grad`` (xi = 1) for every non-frozen layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ACTIVATIONS = {
    "identity": (lambda h: h, np.ones_like),
    "tanh": (np.tanh, lambda h: 1.0 - np.tanh(h) ** 2),
    "relu": (lambda h: np.maximum(h, 0.0), lambda h: (h > 0).astype(np.float64)),
}
D2LOSS = {"mse": lambda yhat, y: 2.0 * (yhat - y), "half_mse": lambda yhat, y: yhat - y}


@dataclass
class NumpyMF:
    """An L-layer MF network with scalar output; ``weights[0]`` is w_1 ``(n1, d)``, then
    ``weights[i-1]`` is w_i ``(n_{i-1}, n_i)`` with ``n_L = 1``; ``biases`` likewise or None."""

    weights: list[np.ndarray]
    activations: list[str]
    biases: list[np.ndarray] | None = None
    frozen: set[int] = field(default_factory=set)  # 1-based layer indices

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-activations [H_1, ..., H_L], each (P, n_i) (H_L is (P, 1))."""
        hs = []
        for i, w in enumerate(self.weights):
            if i == 0:
                h = np.einsum("pd,jd->pj", x, w)
            else:
                a = ACTIVATIONS[self.activations[i - 1]][0](hs[-1])
                h = np.einsum("pa,ab->pb", a, w) / w.shape[0]
            if self.biases is not None:
                h = h + self.biases[i]
            hs.append(h)
        return hs

    def output(self, x: np.ndarray) -> np.ndarray:
        """yhat = phi_L(H_L), shape (P,)."""
        return ACTIVATIONS[self.activations[-1]][0](self.forward(x)[-1])[:, 0]

    def grads(self, x: np.ndarray, y: np.ndarray, loss: str) -> tuple[list, list]:
        """Batch means of the normalized gradients (Grad_i, Grad_i^b) of §1.1."""
        hs = self.forward(x)
        depth = len(self.weights)
        phi = [ACTIVATIONS[a][0] for a in self.activations]
        dphi = [ACTIVATIONS[a][1] for a in self.activations]
        yhat = phi[-1](hs[-1])[:, 0]
        deltas: list[np.ndarray] = [np.empty(0)] * depth
        deltas[-1] = (D2LOSS[loss](yhat, y) * dphi[-1](hs[-1])[:, 0])[:, None]
        for i in range(depth - 2, -1, -1):  # 0-based layer i <-> NP layer i+1
            w_next = self.weights[i + 1]
            back = np.einsum("pb,ab->pa", deltas[i + 1], w_next) / w_next.shape[1]
            deltas[i] = dphi[i](hs[i]) * back
        grads = [np.einsum("pj,pd->jd", deltas[0], x) / len(x)]
        for i in range(1, depth):
            a = phi[i - 1](hs[i - 1])
            grads.append(np.einsum("pa,pb->ab", a, deltas[i]) / len(x))
        return grads, [d.mean(0) for d in deltas]

    def step(self, x: np.ndarray, y: np.ndarray, lr: float, loss: str) -> None:
        """Explicit Euler / full-batch GD: w_i <- w_i - lr * Grad_i (frozen layers fixed)."""
        grads, bias_grads = self.grads(x, y, loss)
        for i in range(len(self.weights)):
            if i + 1 in self.frozen:
                continue
            self.weights[i] = self.weights[i] - lr * grads[i]
            if self.biases is not None:
                self.biases[i] = self.biases[i] - lr * bias_grads[i]
