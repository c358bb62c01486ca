"""The dataset registry: one entry per dataset, read by the data stage, ``make_model`` and the report.

An entry (:class:`DatasetSpec`) says where the genuine data comes from (a class of
``torchvision.datasets``, which checks its archives' MD5 on download), what it holds (image
shape ``(C, H, W)``, number of classes, the label shown in every output), and which offline
mirror layouts the data stage accepts under ``$PROVAE_DATA_MIRROR`` (:class:`MirrorLayout`: a
folder and the reader of :mod:`provae.data` that reads it, by name, tried in order; the first
folder present is used). The image shape is also the network's: :mod:`provae.model` builds the
paper's network for it. No stage script names a dataset; registering an entry is all a new one
needs::

    from provae.datasets import DatasetSpec, idx_gz_layout, register

    register(DatasetSpec(
        "grey16", "Grey-16", image_shape=(1, 16, 16), num_classes=10,
        torchvision=None,  # or a torchvision.datasets class name, e.g. "FashionMNIST", for the download
        mirrors=(idx_gz_layout("grey16"),),  # $PROVAE_DATA_MIRROR/grey16/: four IDX .gz + SHA256SUMS
    ))

Other layouts: ``MirrorLayout(folder, reader, options)`` with the name of a reader of
:mod:`provae.data` (``"idx_gz"``, ``"svhn_mat"``, ``"cifar_pickle"``, ``"image_npz"``; see
``provae.data.READERS``) and its keyword options, or a new reader function itself.
For the DVC pipeline the entry goes below (the stage scripts run in their own processes) and
its name into ``datasets`` in params.yaml.

A reader is ``read(folder, spec, **options) -> (arrays, {"files": {...}, "genuine": bool})`` with
uint8 images ``{split}_images`` [N, C, H, W] and labels ``{split}_labels`` [N], checked against
the entry; the data stage adds the source, the label and the statistics to the provenance.

This module is a leaf: it imports nothing of the package (the readers and the model import it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

Reader = Callable[..., tuple[dict, dict]]  # read(folder: Path, spec: DatasetSpec, **options)


@dataclass(frozen=True)
class MirrorLayout:
    """One accepted layout of a dataset under ``$PROVAE_DATA_MIRROR``: ``folder/`` with the files
    the reader expects plus a ``SHA256SUMS`` covering them.

    ``read`` names a reader of :mod:`provae.data` (a key of ``provae.data.READERS``), or is a
    reader function; ``options`` are its keyword arguments (file names, reference checksums).
    ``label`` replaces the dataset's label for data read this way (a lossy copy must say so);
    ``jpeg_copy`` marks such a copy in the provenance.
    """

    folder: str
    read: str | Reader
    options: Mapping = field(default_factory=dict)
    label: str | None = None
    jpeg_copy: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.read, str) or callable(self.read)):
            raise ValueError(f"mirror layout {self.folder!r}: read must name a reader of provae.data or be one, "
                             f"got {self.read!r}")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    label: str
    image_shape: tuple[int, int, int]
    num_classes: int
    torchvision: str | None = None  # class name in torchvision.datasets, for the genuine download
    mirrors: tuple[MirrorLayout, ...] = ()
    torchvision_kwargs: Mapping = field(default_factory=dict)  # extra constructor arguments
    torchvision_split: str = "train"  # how the class takes the split: train=True/False, or split="train"/"test"

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(n) for n in self.image_shape))
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        if not self.name or not self.label:
            raise ValueError("a dataset needs a name and a label")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"{self.name}: image_shape must be (C, H, W), got {self.image_shape}")
        _, height, width = self.image_shape
        if height != width or height % 4:
            raise ValueError(f"{self.name}: the paper's network needs square images with a side divisible by 4, "
                             f"got {height}x{width}")
        if self.num_classes < 1:
            raise ValueError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        if self.torchvision_split not in ("train", "split"):
            raise ValueError(f"{self.name}: torchvision_split is 'train' or 'split', got {self.torchvision_split!r}")
        if self.torchvision is None and not self.mirrors:
            raise ValueError(f"{self.name}: give a torchvision class or at least one mirror layout")

    @property
    def torchvision_class(self):
        from torchvision import datasets

        return getattr(datasets, self.torchvision) if self.torchvision else None


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to the registry (``replace=True`` to overwrite an entry of the same name)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known: {dataset_names()}")
    return _REGISTRY[name]


# --- the entries ---

# MD5 of the uncompressed canonical MNIST files (as LeCun's site and torchvision's docs give them).
CANONICAL_MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# MD5 of the .gz files, as torchvision's FashionMNIST.resources and KMNIST.resources list them.
CANONICAL_FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CANONICAL_KMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
    "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
    "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
    "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
}
# torchvision's SVHN.split_list, CIFAR10/CIFAR100 train_list + test_list.
CANONICAL_SVHN_MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
                      "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
CANONICAL_CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CANONICAL_CIFAR100_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}

CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR100_BATCHES = {"train": ("train",), "test": ("test",)}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def idx_gz_layout(folder: str, canonical_md5: Mapping[str, str] | None = None) -> MirrorLayout:
    """``folder/`` with the MNIST family's four gzipped IDX files (torchvision's raw names) and SHA256SUMS;
    ``canonical_md5``: the published MD5 of each file (uncompressed, or ``name.gz`` for the .gz)."""
    return MirrorLayout(folder, "idx_gz", {"canonical_md5": dict(canonical_md5 or {})})


for _spec in (
    DatasetSpec("mnist", "MNIST", (1, 28, 28), 10, torchvision="MNIST",
                mirrors=(idx_gz_layout("mnist", CANONICAL_MNIST_MD5),)),
    DatasetSpec("fashion_mnist", "Fashion-MNIST", (1, 28, 28), 10, torchvision="FashionMNIST",
                mirrors=(idx_gz_layout("fashion_mnist", CANONICAL_FASHION_MNIST_MD5),)),
    DatasetSpec("kmnist", "KMNIST", (1, 28, 28), 10, torchvision="KMNIST",
                mirrors=(idx_gz_layout("kmnist", CANONICAL_KMNIST_MD5),)),
    DatasetSpec("svhn", "SVHN", (3, 32, 32), 10, torchvision="SVHN", torchvision_split="split", mirrors=(
        MirrorLayout("svhn", "svhn_mat", {"files": SVHN_FILES, "canonical_md5": CANONICAL_SVHN_MD5}),
    )),
    DatasetSpec("cifar10", "CIFAR-10", (3, 32, 32), 10, torchvision="CIFAR10", mirrors=(
        # The genuine python batches first; else the lossy JPEG copy (shared/data), labelled so.
        MirrorLayout("cifar-10-batches-py", "cifar_pickle", {"files": CIFAR10_BATCHES, "label_key": "labels",
                                                             "canonical_md5": CANONICAL_CIFAR10_MD5}),
        MirrorLayout("cifar10-jpeg", "image_npz", {"filename": "cifar10.npz"},
                     label="CIFAR-10 (JPEG copy)", jpeg_copy=True),
    )),
    DatasetSpec("cifar100", "CIFAR-100", (3, 32, 32), 100, torchvision="CIFAR100", mirrors=(
        MirrorLayout("cifar-100-python", "cifar_pickle", {"files": CIFAR100_BATCHES, "label_key": "fine_labels",
                                                          "canonical_md5": CANONICAL_CIFAR100_MD5}),
    )),
):
    register(_spec)
del _spec
