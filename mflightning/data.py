"""Data modules: the synthetic isotropic-Gaussians task and the MNIST / CIFAR-10 image tasks.

``IsotropicGaussians`` is the task of docs/theory.md §D.1/§D.3 (Mei–Montanari–Nguyen):
``y = +1`` or ``-1`` with probability 1/2 each, and ``x ~ N(0, (1 + y * delta)^2 I_d)``.

``MNIST`` and ``CIFAR10`` read the files through torchvision's own dataset classes, then hold the
whole (optionally subset) split as tensors, so full-batch training is cheap and deterministic. Their
validation set is the official test split (its first ``n_val`` images). Nothing is downloaded unless
``download=True``; missing files raise ``DatasetNotFoundError``, which says how to fetch them.
"""

from __future__ import annotations

import socket
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.nn.functional import one_hot
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets

from mflightning.nn import check_positive_int
from mflightning.sampling import EpochShuffleSampler, ResumableDataLoader

Target = Literal["pm1", "class"]
ImageTarget = Literal["class", "onehot"]

DOWNLOAD_TIMEOUT_S = 30.0
"""Socket timeout (seconds) of each network operation while ``download=True`` fetches a dataset."""


class DatasetNotFoundError(FileNotFoundError):
    """An image dataset's files are missing (or corrupted) and could not be downloaded."""


def isotropic_gaussians(
    n: int, dim: int, delta: float, generator: torch.Generator, target: Target = "pm1"
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` points ``(x, y)``: ``y = ±1``, ``x ~ N(0, (1 + y*delta)^2 I_dim)``.

    Returns ``y`` as float ±1 (``target="pm1"``, for squared losses) or as long 0/1 class indices
    (``target="class"``, for cross-entropy).
    """
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    x = torch.randn(n, dim, generator=generator) * (1 + delta * sign).unsqueeze(1)
    y = sign.float() if target == "pm1" else (sign > 0).long()
    return x, y


class _TensorDataModule(LightningDataModule):
    """Loaders over in-memory ``train_set`` / ``val_set`` tensor datasets.

    Subclasses set ``train_set``, ``val_set``, ``batch_size`` (``None``: full batch) and ``seed``.
    Training is one full batch in a fixed order, or seeded shuffled minibatches; validation is one
    batch unless ``val_batch_size`` is set.
    """

    train_set: TensorDataset
    val_set: TensorDataset
    batch_size: int | None
    seed: int
    val_batch_size: int | None = None
    num_workers: int = 0

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Full batch in a fixed order, or seeded shuffled minibatches.

        Shuffled minibatches come from a ``ResumableDataLoader``: the
        order of epoch ``e`` depends only on ``(seed, e)`` and a run resumed mid-epoch from a
        checkpoint continues with the batches it would have seen.
        """
        size = len(self.train_set)
        batch_size = self.batch_size or size
        if batch_size >= size:
            return DataLoader(self.train_set, batch_size=size, num_workers=self.num_workers)
        return ResumableDataLoader(
            self.train_set,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(size, self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The validation set in order, in one batch or in batches of ``val_batch_size``."""
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_size or len(self.val_set),
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The validation set again: these modules hold no third split (``mfl test``)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The validation set: ``mfl predict`` returns the network's outputs on it."""
        return self.val_dataloader()


class IsotropicGaussians(_TensorDataModule):
    """The isotropic-Gaussians task as a LightningDataModule (fixed train/val sets).

    Args:
        dim: input dimension d.
        delta: variance contrast, ``0 <= delta < 1``.
        n_train: training set size P (the population of the full-batch limit).
        n_val: validation set size.
        batch_size: minibatch size; ``None`` is full batch (gradient descent on the P points).
        target: ``"pm1"`` (±1 labels for squared losses) or ``"class"`` (0/1 for cross-entropy).
        seed: seed of the data draw and of the shuffling order.

    Raises:
        ValueError: if an argument is out of range.
    """

    def __init__(
        self,
        dim: int = 10,
        delta: float = 0.4,
        n_train: int = 256,
        n_val: int = 512,
        batch_size: int | None = None,
        target: Target = "pm1",
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("n_train", n_train), ("n_val", n_val)):
            check_positive_int(name, value)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if not 0 <= delta < 1:
            raise ValueError(f"`delta` must satisfy 0 <= delta < 1, got {delta}.")
        if target not in ("pm1", "class"):
            raise ValueError(f"`target` must be 'pm1' or 'class', got {target!r}.")
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(seed)
        self.train_set = TensorDataset(*isotropic_gaussians(n_train, dim, delta, generator, target))
        self.val_set = TensorDataset(*isotropic_gaussians(n_val, dim, delta, generator, target))
        self.batch_size = batch_size or n_train
        self.seed = seed


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every blocking socket operation (torchvision's downloads set no timeout)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class _ImageDataModule(_TensorDataModule):
    """An image-classification split pair read by a torchvision dataset class, held as tensors.

    Inputs are floats in ``[0, 1]`` (the default dtype), standardised per channel when
    ``normalize``; the training set is the first ``n_train`` official training images and the
    validation set the first ``n_val`` official test images (all of a split when ``None``).

    Args:
        root: folder holding the dataset (torchvision's layout: see ``files``).
        download: fetch the files from the internet in ``prepare_data`` when they are missing.
        flatten: inputs as vectors ``(C*H*W,)`` for MLPs; ``False`` gives images ``(C, H, W)``.
        normalize: subtract the per-channel mean and divide by the per-channel std of the
            training set (the standard constants ``mean`` / ``std``).
        batch_size: minibatch size for training and validation; ``None`` is full batch.
        n_train: use only the first ``n_train`` training images (``None``: all of them).
        n_val: use only the first ``n_val`` test images as validation set (``None``: all).
        target: ``"class"`` (long class indices, for cross-entropy) or ``"onehot"`` (float
            one-hot vectors, for squared losses on C outputs: docs/theory.md §E.3 item 16).
        seed: seed of the minibatch shuffling order.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: if an argument is out of range or not a known option.
    """

    dataset_cls: ClassVar[type[datasets.VisionDataset]]
    files: ClassVar[str]
    """The folder under ``root`` where torchvision looks for the files."""
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    num_classes: ClassVar[int] = 10

    def __init__(
        self,
        root: str | Path = "data",
        download: bool = False,
        flatten: bool = True,
        normalize: bool = True,
        batch_size: int | None = None,
        n_train: int | None = None,
        n_val: int | None = None,
        target: ImageTarget = "class",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("n_train", n_train), ("n_val", n_val)):
            if value is not None:
                check_positive_int(name, value)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        if target not in ("class", "onehot"):
            raise ValueError(f"`target` must be 'class' or 'onehot', got {target!r}.")
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = download
        self.flatten = flatten
        self.normalize = normalize
        self.batch_size = batch_size
        self.val_batch_size = batch_size
        self.n_train = n_train
        self.n_val = n_val
        self.target = target
        self.seed = seed
        self.num_workers = num_workers

    @staticmethod
    @abstractmethod
    def _raw_images(dataset: datasets.VisionDataset) -> Tensor:
        """The split's images as a uint8 tensor of shape ``(N, C, H, W)``."""

    def prepare_data(self) -> None:
        """Download both splits when ``download`` is set (a no-op when the files are there).

        Raises:
            DatasetNotFoundError: if the download fails (e.g. no internet).
        """
        if not self.download:
            return
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                for train in (True, False):
                    self.dataset_cls(str(self.root), train=train, download=True)
        except (OSError, RuntimeError) as err:
            message = self._missing_message(f"could not download it: {err}")
            raise DatasetNotFoundError(message) from err

    def setup(self, stage: str | None = None) -> None:
        """Read both splits into ``train_set`` / ``val_set`` (once; later calls do nothing).

        Args:
            stage: Lightning's stage name (unused: both splits are always loaded).

        Raises:
            DatasetNotFoundError: if the files are missing.
            ValueError: if ``n_train`` / ``n_val`` exceed the split sizes.
        """
        if hasattr(self, "train_set"):
            return
        self.train_set = self._load(train=True, n=self.n_train, name="n_train")
        self.val_set = self._load(train=False, n=self.n_val, name="n_val")

    def _load(self, train: bool, n: int | None, name: str) -> TensorDataset:
        """One split's first ``n`` examples as a ``TensorDataset`` of (inputs, targets)."""
        try:
            dataset = self.dataset_cls(str(self.root), train=train, download=False)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise DatasetNotFoundError(self._missing_message(str(err))) from err
        if n is not None and n > len(dataset):
            raise ValueError(f"`{name}` = {n} exceeds the {len(dataset)} examples of the split.")
        labels = torch.as_tensor(dataset.targets, dtype=torch.long)[:n]
        return TensorDataset(self._inputs(self._raw_images(dataset)[:n]), self._targets(labels))

    def _inputs(self, images: Tensor) -> Tensor:
        """Scale uint8 images to ``[0, 1]``, standardise per channel, flatten if asked."""
        x = images.to(torch.get_default_dtype()) / 255
        if self.normalize:
            x = (x - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)
        return x.flatten(1) if self.flatten else x

    def _targets(self, labels: Tensor) -> Tensor:
        """Class indices, or one-hot float vectors for ``target="onehot"``."""
        if self.target == "class":
            return labels
        return one_hot(labels, self.num_classes).to(torch.get_default_dtype())

    def _missing_message(self, reason: str) -> str:
        """Say where the files were looked for and how to fetch them."""
        name = self.dataset_cls.__name__
        return (
            f"{name} not found in '{self.root / self.files}' ({reason}). Fetch it with "
            f"`python -c \"import torchvision; torchvision.datasets.{name}('{self.root}', "
            f'download=True)"`, or pass download=True (CLI: --data.init_args.download=true).'
        )


class MNIST(_ImageDataModule):
    """MNIST (60000 train / 10000 test 28x28 grey digits) as tensors: see ``_ImageDataModule``.

    Inputs are ``(784,)`` vectors (``flatten=True``) or ``(1, 28, 28)`` images; torchvision expects
    the uncompressed IDX files in ``root/MNIST/raw``.
    """

    dataset_cls = datasets.MNIST
    files = "MNIST/raw"
    mean = (0.1307,)
    std = (0.3081,)

    @staticmethod
    def _raw_images(dataset: datasets.VisionDataset) -> Tensor:
        """MNIST's ``(N, 28, 28)`` uint8 tensor as ``(N, 1, 28, 28)``."""
        return dataset.data.unsqueeze(1)


class CIFAR10(_ImageDataModule):
    """CIFAR-10 (50000 train / 10000 test 32x32 colour images) as tensors: see ``_ImageDataModule``.

    Inputs are ``(3072,)`` vectors (``flatten=True``, channel-major) or ``(3, 32, 32)`` images;
    torchvision expects the python pickle batches in ``root/cifar-10-batches-py`` (md5-checked).
    """

    dataset_cls = datasets.CIFAR10
    files = "cifar-10-batches-py"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    @staticmethod
    def _raw_images(dataset: datasets.VisionDataset) -> Tensor:
        """CIFAR-10's ``(N, 32, 32, 3)`` uint8 array as ``(N, 3, 32, 32)``."""
        return torch.as_tensor(dataset.data).permute(0, 3, 1, 2)
