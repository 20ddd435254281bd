"""MNIST / CIFAR10 datamodules on tiny files in the real on-disk formats, read by torchvision."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch import Trainer

from mflightning import MeanFieldMLP, MeanFieldModule
from mflightning.data import CIFAR10, MNIST, DatasetNotFoundError, IsotropicGaussians

N_TRAIN, N_TEST = 20, 10


def _pixel(i: int, channel: int) -> int:
    """The constant value of channel ``channel`` of image ``i`` (train: i, test: 100 + i)."""
    return (7 * i + 40 * channel) % 256


def _labels(n: int, offset: int) -> list[int]:
    return [(i + offset) % 10 for i in range(n)]


def _images(n: int, offset: int, channels: int, side: int) -> np.ndarray:
    """``(n, channels, side, side)`` uint8 images, each channel a constant ``_pixel``."""
    values = [[_pixel(offset + i, c) for c in range(channels)] for i in range(n)]
    return np.broadcast_to(np.array(values, np.uint8)[:, :, None, None], (n, channels, side, side))


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """An uncompressed big-endian IDX file (2051: uint8 images, 2049: uint8 labels)."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _write_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", N_TRAIN, 0), ("t10k", N_TEST, 100)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, _images(n, offset, 1, 28)[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, np.array(_labels(n, offset)))


def _pickle(path: Path, entry: dict[str, object]) -> str:
    path.write_bytes(pickle.dumps(entry))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five train batches (4 images each), a test batch and ``batches.meta``.

    torchvision checks every file against the md5 of the real CIFAR-10 release; the test swaps
    only that checksum table for the md5s of these files, so the real integrity check still runs.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per_batch = N_TRAIN // 5
    train_list = []
    for b in range(5):
        images = _images(per_batch, b * per_batch, 3, 32).reshape(per_batch, -1)
        entry = {"data": images, "labels": _labels(per_batch, b * per_batch)}
        train_list.append([f"data_batch_{b + 1}", _pickle(folder / f"data_batch_{b + 1}", entry)])
    test = {"data": _images(N_TEST, 100, 3, 32).reshape(N_TEST, -1), "labels": _labels(N_TEST, 100)}
    test_md5 = _pickle(folder / "test_batch", test)
    meta_md5 = _pickle(folder / "batches.meta", {"label_names": [f"c{k}" for k in range(10)]})
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", [["test_batch", test_md5]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": meta_md5})


@pytest.fixture(params=[MNIST, CIFAR10])
def image_data(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> type[MNIST] | type[CIFAR10]:
    """The datamodule class, with its tiny files written under ``tmp_path``."""
    if request.param is MNIST:
        _write_mnist(tmp_path)
    else:
        _write_cifar(tmp_path, monkeypatch)
    return request.param


def _loaded(cls: type[MNIST] | type[CIFAR10], root: Path, **kwargs) -> MNIST | CIFAR10:
    dm = cls(root=root, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("flatten", [True, False])
def test_shapes_dtypes_and_layout(image_data: type[MNIST], tmp_path: Path, flatten: bool) -> None:
    dm = _loaded(image_data, tmp_path, flatten=flatten)
    channels, side = (1, 28) if image_data is MNIST else (3, 32)
    shape = (channels * side * side,) if flatten else (channels, side, side)
    for dataset, n, offset in ((dm.train_set, N_TRAIN, 0), (dm.val_set, N_TEST, 100)):
        x, y = dataset.tensors
        assert x.shape == (n, *shape) and x.dtype == torch.float32
        assert y.dtype == torch.long and y.tolist() == _labels(n, offset)
    # Flattening is channel-major: the first H*W coordinates are channel 0.
    x = dm.train_set.tensors[0][1].reshape(channels, side * side)
    assert all(len(set(row.tolist())) == 1 for row in x)


@pytest.mark.parametrize("normalize", [True, False])
def test_pixel_values_and_normalization(
    image_data: type[MNIST], tmp_path: Path, normalize: bool
) -> None:
    dm = _loaded(image_data, tmp_path, flatten=False, normalize=normalize)
    mean, std = (image_data.mean, image_data.std) if normalize else ((0.0,) * 3, (1.0,) * 3)
    x = dm.val_set.tensors[0]
    for i in range(N_TEST):
        for c in range(x.shape[1]):
            expected = (_pixel(100 + i, c) / 255 - mean[c]) / std[c]
            torch.testing.assert_close(x[i, c], torch.full_like(x[i, c], expected))


def test_onehot_targets(image_data: type[MNIST], tmp_path: Path) -> None:
    y = _loaded(image_data, tmp_path, target="onehot").train_set.tensors[1]
    assert y.shape == (N_TRAIN, 10) and y.dtype == torch.float32
    assert torch.equal(y.sum(1), torch.ones(N_TRAIN))
    assert y.argmax(1).tolist() == _labels(N_TRAIN, 0)


def test_subsets_are_the_first_examples(image_data: type[MNIST], tmp_path: Path) -> None:
    full = _loaded(image_data, tmp_path)
    sub = _loaded(image_data, tmp_path, n_train=7, n_val=3)
    for part, whole, n in ((sub.train_set, full.train_set, 7), (sub.val_set, full.val_set, 3)):
        for a, b in zip(part.tensors, whole.tensors, strict=True):
            assert torch.equal(a, b[:n])
    with pytest.raises(ValueError, match="n_train"):
        _loaded(image_data, tmp_path, n_train=N_TRAIN + 1)


def test_full_batch_loaders_keep_the_order(image_data: type[MNIST], tmp_path: Path) -> None:
    dm = _loaded(image_data, tmp_path)
    pairs = ((dm.train_dataloader(), dm.train_set), (dm.val_dataloader(), dm.val_set))
    for loader, dataset in pairs:
        (batch,) = list(loader)
        for a, b in zip(batch, dataset.tensors, strict=True):
            assert torch.equal(a, b)


def test_seeded_shuffling_is_reproducible(image_data: type[MNIST], tmp_path: Path) -> None:
    def order(seed: int) -> list[int]:
        loader = _loaded(image_data, tmp_path, batch_size=4, seed=seed).train_dataloader()
        return [label for _, y in loader for label in y.tolist()]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(_labels(N_TRAIN, 0))
    assert len(_loaded(image_data, tmp_path, batch_size=4).val_dataloader()) == 3


def test_trainer_fits_an_mlp_on_onehot_targets(image_data: type[MNIST], tmp_path: Path) -> None:
    dm = image_data(root=tmp_path, target="onehot", batch_size=10)
    net = MeanFieldMLP(784 if image_data is MNIST else 3072, [16], out_features=10)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(MeanFieldModule(net, lr=0.1, loss="half_mse"), dm)
    assert trainer.global_step == 2


@pytest.mark.parametrize("cls", [MNIST, CIFAR10])
def test_missing_files_raise_a_clear_error(cls: type[MNIST], tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        _loaded(cls, tmp_path / "nowhere")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nowhere" / cls.files) in message
    assert "download=True" in message and f"torchvision.datasets.{cls.__name__}(" in message


def test_failed_download_raises_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(self: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="no network") as info:
        MNIST(root=tmp_path, download=True).prepare_data()
    assert str(tmp_path / "MNIST" / "raw") in str(info.value) and "download" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("batch_size", 0),
        ("n_train", -3),
        ("n_val", 2.5),
        ("n_train", True),
        ("num_workers", -1),
        ("target", "pm1"),
    ],
)
@pytest.mark.parametrize("cls", [MNIST, CIFAR10])
def test_bad_arguments_name_the_argument(cls: type[MNIST], name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})


def test_isotropic_gaussians_is_unchanged() -> None:
    dm = IsotropicGaussians(dim=3, n_train=8, n_val=5, batch_size=4, target="class", seed=2)
    assert dm.batch_size == 4 and dm.train_set.tensors[0].shape == (8, 3)
    assert len(dm.train_dataloader()) == 2
    (val,) = list(dm.val_dataloader())
    assert torch.equal(val[1], dm.val_set.tensors[1])
