"""Width fit of the output gap: width-N networks coupled to the particle limit (guide/limit.md)."""

import torch

import mflightning as mfl
from mflightning.losses import mean_field_loss

data = mfl.data.IsotropicGaussians(dim=10, delta=0.4, n_train=256, seed=0)
x, y = data.train_set.tensors  # the population: P = 256 points, full-batch GD
x_probe = data.val_set.tensors[0]  # probe inputs for the output gap

arch = mfl.MeanFieldMLP(
    in_features=10,
    widths=[8, 8],  # placeholder widths: only the architecture is used
    activations=["relu", "tanh", "identity"],
    init=[mfl.Normal(0, 1), mfl.Normal(1, 0.5), mfl.Normal(0, 1)],
)
lr, steps, widths, particles = 0.1, 30, [32, 64, 128], 1024  # M = 8 * max N

gaps: dict[int, list[float]] = {n: [] for n in widths}
for seed in range(4):
    g = torch.Generator().manual_seed(seed)
    # the limit: the same architecture at width M, in float64; one Euler step = one GD step
    wide = arch.with_widths([particles, particles], generator=g)
    solver = mfl.ParticleLimitSolver(wide, lr=lr, loss="half_mse")
    # couple every width-N network to the particles at t = 0 (subsample without replacement)
    nets = [solver.couple([n, n], generator=g, dtype=torch.float32)[0] for n in widths]
    for net in nets:  # train each finite network: full-batch GD with the MF multipliers
        opt = torch.optim.SGD(mfl.param_groups(net, lr=lr))
        for _ in range(steps):
            opt.zero_grad()
            mean_field_loss("half_mse", net(x), y).backward()
            opt.step()
    solver.run((x, y), steps, progress=False)  # advance the limit to t = steps * lr = 3
    for n, net in zip(widths, nets, strict=True):
        with torch.no_grad():
            gaps[n].append(mfl.functional.output_gap(net(x_probe), solver(x_probe)).item())

fit = mfl.fit_loglog_slope(gaps, n_boot=500)  # RMS over seeds at each width, then log-log slope
print({n: [round(v, 4) for v in values] for n, values in gaps.items()})
print(f"slope {fit.slope:.2f}, 90% CI [{fit.ci_low:.2f}, {fit.ci_high:.2f}]")
print("contains -1/2:", fit.contains(-0.5))
