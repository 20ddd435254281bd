"""LimitTracker: log the gaps to the limit while a MeanFieldModule trains (guide/limit.md)."""

from lightning.pytorch import Trainer

import mflightning as mfl

data = mfl.data.IsotropicGaussians(dim=10, delta=0.4, n_train=256)
probe = data.val_set.tensors  # (x, y): output gap and loss gap on 512 held-out points

net = mfl.MeanFieldMLP(
    in_features=10,
    widths=[64, 64],
    activations=["relu", "tanh", "identity"],
    init=[mfl.Normal(0, 1), mfl.Normal(1, 0.5), mfl.Normal(0, 1)],
)
module = mfl.MeanFieldModule(net, lr=0.1, loss="half_mse")
# builds a float64 solver at M = 512 particles and couples the module's network to it
tracker = mfl.LimitTracker(particles=512, every_n_steps=10, probe=probe)
trainer = Trainer(
    max_steps=50,
    callbacks=[tracker],
    accelerator="cpu",
    logger=False,  # give a logger (CSVLogger, ...) to record the gaps every 10 steps
    enable_checkpointing=False,
    enable_progress_bar=False,
    limit_val_batches=0,
)
trainer.fit(module, data)
# limit/output_gap, limit/loss_gap, limit/dev/layer1..3, limit/time and mf_time (both 5.0)
print(tracker.last_gaps)
