"""The paper's datasets as uint8 tensors in memory, and a loader that augments whole batches at once.

Fashion-MNIST is read from its IDX files (the Debian package ``dataset-fashion-mnist`` installs them
under /usr/share/datasets/fashion-mnist). CIFAR-10/100 and Food101 come through torchvision; Food101
is converted once (zero-pad to square, resize to 32x32) and cached next to the data.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AUGMENTS = ("paper", "no_cutout", "none")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    channels: int
    size: int
    crop_flip: bool                      # random crop (padding 4) and horizontal flip, CIFAR-style
    fixed_mean_std: tuple | None = None  # None: the training set's own mean and std


DATASETS = {
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, 1, 28, crop_flip=False),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, crop_flip=True),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, crop_flip=True),
    # Food101 at 32x32: flip only (the authors' transform has no crop), ImageNet statistics.
    "food101": DatasetSpec("food101", 101, 3, 32, crop_flip=False, fixed_mean_std=(IMAGENET_MEAN, IMAGENET_STD)),
}


class DatasetNotFound(FileNotFoundError):
    """A dataset is missing: says which, where we looked, and the command that fixes it."""


class DatasetCorrupt(ValueError):
    """A dataset file exists but cannot be read: names the file and how to get a good one."""


@dataclass
class ArrayData:
    images: torch.Tensor   # uint8, (N, C, H, W)
    labels: torch.Tensor   # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ArrayData":
        return ArrayData(self.images[indices], self.labels[indices])


def default_data_root() -> Path:
    return Path(os.environ.get("AACE_DATA", Path.home() / ".cache" / "aace" / "data"))


def spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    return DATASETS[name]


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FMNIST_FIX = ("install the Debian package (sudo apt-get install dataset-fashion-mnist), or give --data-root DIR "
               "(data_root= in Python) a folder holding the four IDX files (.gz or not), or add --download true "
               "on a machine with a network")
_IDX_NAMES = ", ".join(f"{stem}[.gz]" for stems in _IDX_FILES.values() for stem in stems)
# SHA-256 of each file's uncompressed IDX bytes, so that a .gz compressed anew (Debian's are; their MD5s differ
# from the ones torchvision checks on Zalando's downloads) and an uncompressed copy are both recognised. Computed
# from Debian's dataset-fashion-mnist (2020 upload of Zalando's release); a copy whose bytes differ is another
# data set, trained only with modified_data=True, which puts its digest into the run's hash.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


class DatasetModified(DatasetCorrupt):
    """A dataset file is readable but is not the published data set: names the file and the way to train on it
    anyway (``modified_data``)."""


def _idx_bytes(path: Path) -> bytes:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged compressed stream
        raise DatasetCorrupt(f"cannot read {path}: {err}. Replace the file: {_FMNIST_FIX}") from err


def read_idx(path: Path, sha256: str | None = None) -> torch.Tensor:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a uint8 tensor; with ``sha256``, its
    uncompressed bytes must have that digest (``DatasetModified`` otherwise)."""
    raw = _idx_bytes(path)
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DatasetModified(f"{path} is not Fashion-MNIST as published (its uncompressed SHA-256 is "
                              f"{hashlib.sha256(raw).hexdigest()[:16]}..., expected {sha256[:16]}...). Replace it: "
                              f"{_FMNIST_FIX}; or, to train on this modified copy on purpose, add --modified-data "
                              f"true (its digest then goes into the run's hash, so it is never read back as a run "
                              f"on the real data)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DatasetCorrupt(f"{path} is not an IDX file of unsigned bytes (bad magic number). "
                             f"Replace it: {_FMNIST_FIX}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetCorrupt(f"{path} is truncated (header incomplete). Replace it: {_FMNIST_FIX}")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    expected = 1
    for d in shape:
        expected *= d
    if len(body) != expected:
        raise DatasetCorrupt(f"{path} holds {len(body)} bytes of data, its header promises {expected} "
                             f"(shape {shape}): truncated or damaged. Replace it: {_FMNIST_FIX}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_paths(data_root: Path | None, download: bool) -> dict | None:
    """{split: [images path, labels path]} of the first folder holding all four IDX files; None when none does."""
    # A given root means that folder: the system copy is used only when no root is given.
    folders = [data_root, data_root / "FashionMNIST" / "raw"] if data_root else [DEBIAN_FASHION_MNIST]
    if data_root and not download and not any(_find_idx(f, stem) for f in folders
                                                   for stems in _IDX_FILES.values() for stem in stems):
        state = "does not exist" if not data_root.exists() else (
            "is not a folder" if not data_root.is_dir() else "holds no Fashion-MNIST IDX file")
        raise DatasetNotFound(f"Fashion-MNIST not found: --data-root {data_root} {state}. It should hold "
                              f"{_IDX_NAMES} (or FashionMNIST/raw/ with them); or leave out --data-root to use "
                              f"the system copy in {DEBIAN_FASHION_MNIST}; or add --download true")
    for folder in folders:
        paths = {split: [_find_idx(folder, stem) for stem in stems] for split, stems in _IDX_FILES.items()}
        if all(p is not None for ps in paths.values() for p in ps):
            return paths
    if not download:
        raise DatasetNotFound(f"Fashion-MNIST not found: looked for its IDX files in "
                              f"{', '.join(str(f) for f in folders)}. To fix: {_FMNIST_FIX}")
    return None


def _load_fashion_mnist(data_root: Path | None, download: bool, verify: bool = True) -> tuple[ArrayData, ArrayData]:
    paths = _fashion_mnist_paths(data_root, download)
    if paths is None:
        import torchvision
        root = data_root or default_data_root()
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        return _load_fashion_mnist(root, False, verify)
    splits = []
    for split in ("train", "test"):
        images_path, labels_path = paths[split]
        digests = [FASHION_MNIST_SHA256[stem] if verify else None for stem in _IDX_FILES[split]]
        images, labels = read_idx(images_path, digests[0]), read_idx(labels_path, digests[1])
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise DatasetCorrupt(f"{images_path} and {labels_path} do not match: images {tuple(images.shape)}, "
                                 f"labels {tuple(labels.shape)}. Replace them: {_FMNIST_FIX}")
        if len(labels) and int(labels.max()) >= 10:
            raise DatasetCorrupt(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST has 10 classes. "
                                 f"Replace it: {_FMNIST_FIX}")
        splits.append(ArrayData(images[:, None].contiguous(), labels.long()))
    return splits[0], splits[1]


def dataset_digest(name: str, data_root: str | Path | None = None) -> str:
    """SHA-256 over a data set's files as they are (uncompressed IDX bytes, in a fixed order): what a run on a
    modified copy puts into its hash. Fashion-MNIST only (the torchvision data sets check their own files)."""
    if name != "fashion_mnist":
        raise ValueError(f"RunConfig.modified_data: supported for fashion_mnist only (torchvision checks "
                         f"{name}'s files itself), got dataset {name!r}")
    paths = _fashion_mnist_paths(Path(data_root) if data_root else None, download=False)
    total = hashlib.sha256()
    for split in ("train", "test"):
        for path in paths[split]:
            total.update(hashlib.sha256(_idx_bytes(path)).digest())
    return total.hexdigest()


# ----------------------------------------------------------------------------- torchvision datasets

def _torchvision_fix(name: str, root: Path) -> str:
    return (f"run once with network access: python -c \"from aace.data import load_dataset; "
            f"load_dataset('{name}', data_root='{root}', download=True)\"")


def _load_cifar(name: str, root: Path, download: bool) -> tuple[ArrayData, ArrayData]:
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:
            raise DatasetNotFound(f"{name} not found or corrupted under {root / cls.base_folder} ({err}). "
                                  f"To fix: {_torchvision_fix(name, root)}") from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append(ArrayData(images, torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1]


def pad_to_square_and_resize(image, size: int = 32) -> torch.Tensor:
    """Zero-pad a PIL image to a centred square, resize to size x size: uint8 (3, size, size)."""
    from torchvision.transforms import functional as TF
    x = TF.pil_to_tensor(image.convert("RGB"))
    h, w = x.shape[1:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    x = torch.nn.functional.pad(x, (left, side - w - left, top, side - h - top))
    return TF.resize(x, [size, size], antialias=True)


def _load_food101(root: Path, download: bool) -> tuple[ArrayData, ArrayData]:
    import torchvision
    cache = root / "food-101" / "aace_32x32.pt"
    if cache.is_file():
        try:
            stored = torch.load(cache)
            return ArrayData(*stored["train"]), ArrayData(*stored["test"])
        except Exception as err:  # noqa: BLE001 - any damage means: rebuild the cache
            print(f"Food101 cache {cache} is unreadable ({err}); rebuilding it from the images")
    splits = []
    for split in ("train", "test"):
        try:
            ds = torchvision.datasets.Food101(str(root), split=split, download=download)
        except RuntimeError as err:
            raise DatasetNotFound(f"food101 not found under {root / 'food-101'} ({err}). "
                                  f"To fix: {_torchvision_fix('food101', root)}") from err
        from tqdm.auto import tqdm
        images = torch.stack([pad_to_square_and_resize(ds[i][0]) for i in
                              tqdm(range(len(ds)), desc=f"food101 {split} to 32x32", leave=False)])
        splits.append(ArrayData(images, torch.tensor(ds._labels, dtype=torch.int64)))
    tmp = cache.with_suffix(".tmp")
    torch.save({"train": (splits[0].images, splits[0].labels), "test": (splits[1].images, splits[1].labels)}, tmp)
    os.replace(tmp, cache)
    return splits[0], splits[1]


def load_dataset(name: str, data_root: str | Path | None = None, download: bool = False,
                 verify: bool = True) -> tuple[ArrayData, ArrayData]:
    """(train, test) as uint8 image tensors (N, C, H, W) and int64 labels. Fashion-MNIST's files are checked
    against their published content (``FASHION_MNIST_SHA256``) unless ``verify`` is False; CIFAR's by
    torchvision (the MD5 of each batch file, at every load); Food101's archive by torchvision at download."""
    spec(name)
    root = Path(data_root) if data_root else None
    if name == "fashion_mnist":
        return _load_fashion_mnist(root, download, verify)
    root = root or default_data_root()
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, root, download)
    return _load_food101(root, download)


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of ``size`` samples, classes as balanced as the data allows, chosen by ``seed``, sorted."""
    if not 0 < size <= len(labels):
        raise ValueError(f"subset size must lie in [1, {len(labels)}], got {size}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    chosen, remaining, quota_left = [], size, len(classes)
    for idx in sorted(per_class, key=len):  # small classes first, so their shortfall goes to the others
        take = min(len(idx), remaining // quota_left)
        chosen.append(idx[:take])
        remaining, quota_left = remaining - take, quota_left - 1
    chosen = torch.cat(chosen)
    if remaining:  # the remainder of the division: one more from randomly chosen classes
        used = torch.zeros(len(labels), dtype=torch.bool)
        used[chosen] = True
        pool = torch.nonzero(~used).flatten()
        chosen = torch.cat([chosen, pool[torch.randperm(len(pool), generator=g)[:remaining]]])
    return torch.sort(chosen).values


def long_tail_counts(per_class: int, num_classes: int, ratio: float) -> list[int]:
    """Images of each class in a long-tailed subset (the exponential profile of Cao et al., NeurIPS 2019, as
    CIFAR-10-LT): class c keeps per_class * ratio ** (-c / (K - 1)) images, truncated, at least 1, so that class 0
    (the head) keeps all and the last class ``ratio`` times fewer."""
    return [max(1, int(per_class * ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def long_tail_subset(labels: torch.Tensor, indices: torch.Tensor, counts: list[int], seed: int) -> torch.Tensor:
    """Of a balanced subset (``indices``), ``counts[c]`` images of each class c drawn by ``seed``: a long-tailed
    subset nested in it, sorted."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, n in enumerate(counts):
        of_class = indices[labels[indices] == c]
        if len(of_class) < n:
            raise ValueError(f"RunConfig.imbalance_ratio: the balanced subset holds {len(of_class)} images of class "
                             f"{c}, fewer than the {n} its long tail keeps")
        chosen.append(of_class[torch.randperm(len(of_class), generator=g)[:n]])
    return torch.sort(torch.cat(chosen)).values


def train_validation_split(labels: torch.Tensor, train_size: int | None, val_size: int, seed: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices), disjoint, each stratified by class.

    With a ``train_size`` the training subset is drawn first, exactly as without validation, and the
    validation images come from the rest of the pool; without one, the validation images are drawn first
    and every other image trains.
    """
    n = len(labels)
    if not (isinstance(val_size, int) and 1 <= val_size < n):
        raise ValueError(f"RunConfig.val_subset: expected an integer in [1, {n - 1}] for a training pool of {n} "
                         f"images, got {val_size!r}")
    if train_size is not None and train_size + val_size > n:
        raise ValueError(f"RunConfig.train_subset + RunConfig.val_subset: expected at most the {n} images of the "
                         f"training pool, got {train_size} + {val_size}")
    if train_size is None:
        val = stratified_subset(labels, val_size, seed)
        rest = torch.ones(n, dtype=torch.bool)
        rest[val] = False
        return torch.nonzero(rest).flatten(), val
    train = stratified_subset(labels, train_size, seed)
    rest = torch.ones(n, dtype=torch.bool)
    rest[train] = False
    pool = torch.nonzero(rest).flatten()
    return train, pool[stratified_subset(labels[pool], val_size, seed + 1)]


def symmetric_label_noise(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """A copy of ``labels`` in which round(fraction * N) samples, chosen by ``seed``, carry a uniformly
    drawn wrong class."""
    g = torch.Generator().manual_seed(seed + 7919)
    noisy = labels.clone()
    chosen = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=g)
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def mean_std(spec_: DatasetSpec, train: ArrayData) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel normalisation constants in [0, 1] pixel units."""
    if spec_.fixed_mean_std is not None:
        return torch.tensor(spec_.fixed_mean_std[0]), torch.tensor(spec_.fixed_mean_std[1])
    x = train.images.double() / 255.0
    return x.mean(dim=(0, 2, 3)).float(), x.std(dim=(0, 2, 3)).float()
