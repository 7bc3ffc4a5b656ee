"""Loaders on small files written here in the datasets' real on-disk formats."""
import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from aace import data
from aace.batches import BatchLoader, cutout, random_crop
from aace.data import (DATASETS, ArrayData, DatasetCorrupt, DatasetNotFound, load_dataset,
                       mean_std, stratified_subset)


def write_idx(path, array, compress=True):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def fake_fashion_mnist(folder, n_train=40, n_test=20, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        write_idx(folder / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, compress, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    arrays = fake_fashion_mnist(tmp_path, compress=compress)
    train, test = load_dataset("fashion_mnist", tmp_path, verify=False)
    assert train.images.shape == (40, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"][0].astype(np.uint8)))
    assert torch.equal(test.labels, torch.from_numpy(arrays["t10k"][1]).long())


def test_fashion_mnist_missing_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset("fashion_mnist")
    assert "nowhere" in str(err.value) and "--data-root" in str(err.value)
    # a given root means that folder: no fallback to the system copy, and the message names the folder
    (tmp_path / "empty").mkdir()
    fake_fashion_mnist(tmp_path / "system")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "system")
    with pytest.raises(DatasetNotFound, match="holds no Fashion-MNIST IDX file") as err:
        load_dataset("fashion_mnist", tmp_path / "empty")
    assert f"--data-root {tmp_path / 'empty'}" in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    with pytest.raises(DatasetNotFound, match="does not exist"):
        load_dataset("fashion_mnist", tmp_path / "typo")


def test_truncated_and_wrong_format_files_named(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    fake_fashion_mnist(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetCorrupt, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("fashion_mnist", tmp_path, verify=False)
    target.write_bytes(gzip.compress(b"\x89PNG" + raw[4:]))
    with pytest.raises(DatasetCorrupt, match="magic"):
        load_dataset("fashion_mnist", tmp_path, verify=False)
    target.write_bytes(gzip.compress(raw)[:50])
    with pytest.raises(DatasetCorrupt, match="cannot read"):
        load_dataset("fashion_mnist", tmp_path, verify=False)


def test_a_fake_copy_is_refused_as_fashion_mnist_by_its_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    fake_fashion_mnist(tmp_path)
    with pytest.raises(data.DatasetModified, match="train-images-idx3-ubyte.gz is not Fashion-MNIST as published"):
        load_dataset("fashion_mnist", tmp_path)


needs_debian = pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")


@needs_debian
def test_modified_labels_are_refused_or_trained_under_their_own_hash(tmp_path):
    """The real files with every training label set to 0, in valid IDX format: refused by name (exit code 3
    from the command line); with modified_data the run's hash carries the data's digest, so it can never be read
    back as the genuine run."""
    import shutil
    import subprocess
    import sys
    from aace.config import profile_config
    for f in data.DEBIAN_FASHION_MNIST.iterdir():
        shutil.copy(f, tmp_path / f.name)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[:8] + bytes(len(raw) - 8)))
    with pytest.raises(data.DatasetModified, match="train-labels-idx1-ubyte.gz is not Fashion-MNIST"):
        load_dataset("fashion_mnist", tmp_path)
    assert int(load_dataset("fashion_mnist", tmp_path, verify=False)[0].labels.max()) == 0
    out = subprocess.run([sys.executable, "-m", "aace", "train", "--profile", "smoke", "--epochs", "1",
                          "--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3 and "train-labels-idx1-ubyte.gz is not Fashion-MNIST" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    genuine = profile_config("smoke")
    modified = profile_config("smoke", data_root=str(tmp_path), modified_data=True)
    assert genuine.run_hash("cpu", 1) == profile_config("smoke", data_root=str(tmp_path)).run_hash("cpu", 1)
    assert modified.run_hash("cpu", 1) != genuine.run_hash("cpu", 1)
    assert modified.run_hash("cpu", 1) != profile_config("smoke", modified_data=True).run_hash("cpu", 1)
    with pytest.raises(ValueError, match="RunConfig.modified_data"):
        profile_config("smoke", dataset="cifar10", modified_data=True)


@needs_debian
def test_real_fashion_mnist_from_debian_package():
    train, test = load_dataset("fashion_mnist")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))


def write_cifar(root, name, n=30):
    classes = 10 if name == "cifar10" else 100
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    key = "labels" if name == "cifar10" else "fine_labels"
    for filename, _ in cls.train_list + cls.test_list:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(np.arange(n) % classes)}
        with open(folder / filename, "wb") as f:
            pickle.dump(batch, f)
    meta_key = cls.meta["key"]
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(classes)]}, f)
    return batch


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_through_torchvision(tmp_path, name, monkeypatch):
    last_batch = write_cifar(tmp_path, name)
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    # Our files cannot match torchvision's MD5 sums; bypass the check here only, not for users.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train, test = load_dataset(name, tmp_path)
    n_train_files = len(cls.train_list)
    assert train.images.shape == (30 * n_train_files, 3, 32, 32) and test.images.shape == (30, 3, 32, 32)
    expected = torch.from_numpy(last_batch["data"].reshape(30, 3, 32, 32))
    assert torch.equal(test.images, expected)  # the test batch is the last file written


def test_cifar_missing_gives_fix(tmp_path):
    with pytest.raises(DatasetNotFound, match="download=True"):
        load_dataset("cifar10", tmp_path)


def test_food101_layout_pad_resize_and_cache(tmp_path):
    base = tmp_path / "food-101"
    (base / "meta").mkdir(parents=True)
    meta = {}
    for split in ("train", "test"):
        meta[split] = {"apple_pie": [], "bibimbap": []}
        for k, cls in enumerate(("apple_pie", "bibimbap")):
            (base / "images" / cls).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                name = f"{split}{i}"
                color = (200, 10, 10) if cls == "apple_pie" else (10, 200, 10)
                Image.new("RGB", (64, 40), color).save(base / "images" / cls / f"{name}.jpg")
                meta[split][cls].append(f"{cls}/{name}")
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    train, test = load_dataset("food101", tmp_path)
    assert train.images.shape == (4, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 1, 1]
    # 64x40 padded to 64x64: top and bottom bands are zero, the centre keeps the colour
    assert train.images[0, :, 0].max() < 20 and train.images[0, 0, 16, 16] > 150
    assert (base / "aace_32x32.pt").is_file()
    again, _ = load_dataset("food101", tmp_path)
    assert torch.equal(again.images, train.images)


def test_stratified_subset_balanced_and_fixed_by_seed():
    labels = torch.arange(1000) % 10
    idx = stratified_subset(labels, 105, seed=3)
    assert len(idx) == 105 and len(torch.unique(idx)) == 105
    counts = labels[idx].bincount()
    assert counts.min() >= 10 and counts.max() <= 11
    assert torch.equal(idx, stratified_subset(labels, 105, seed=3))
    assert not torch.equal(idx, stratified_subset(labels, 105, seed=4))
    with pytest.raises(ValueError, match="subset size"):
        stratified_subset(labels, 0, 0)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    out = random_crop(images, 2, torch.tensor([0, 3]), torch.tensor([4, 1]))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert torch.equal(out[0], padded[0, :, 0:6, 4:10]) and torch.equal(out[1], padded[1, :, 3:9, 1:7])


def test_cutout_zeroes_the_clipped_16x16_square():
    x = torch.ones(3, 3, 32, 32)
    out = cutout(x, 16, torch.tensor([16, 0, 16]), torch.tensor([16, 31, 16]), torch.tensor([True, True, False]))
    zeros = (out == 0).all(1)
    assert zeros[0].sum() == 256 and zeros[0, 8:24, 8:24].all()          # centred: the full square
    assert zeros[1].sum() == 8 * 9 and zeros[1, 0:8, 23:32].all()        # corner: clipped at the border
    assert zeros[2].sum() == 0                                          # not applied


def test_paper_augmentation_applies_cutout_to_about_half_the_batch():
    s = DATASETS["fashion_mnist"]  # no crop, whose zero padding would look like Cutout here
    data = ArrayData(torch.full((1000, 1, 28, 28), 200, dtype=torch.uint8), torch.zeros(1000, dtype=torch.long))
    x, _ = next(BatchLoader(data, s, torch.zeros(1), torch.ones(1), 1000, train=True, seed=0).epoch(0))
    zeroed = (x == 0).all(1).flatten(1).any(1).float().mean()
    assert 0.4 < zeroed < 0.6


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_batch_loader_shapes_normalisation_and_determinism(name):
    s = DATASETS[name]
    n = 300
    images = torch.randint(0, 256, (n, s.channels, s.size, s.size), dtype=torch.uint8)
    dataset = ArrayData(images, torch.arange(n) % 10)
    mean, std = mean_std(s, dataset)
    loader = BatchLoader(dataset, s, mean, std, 128, train=True, seed=1)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    assert batches[0][0].shape == (128, s.channels, s.size, s.size) and batches[-1][0].shape[0] == 44
    again = list(BatchLoader(dataset, s, mean, std, 128, train=True, seed=1).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(loader.epoch(1))
    assert not torch.equal(batches[0][0], other[0][0])
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels.sort().values, dataset.labels.sort().values)  # each sample once per epoch
    plain = list(BatchLoader(dataset, s, mean, std, 1000, train=False).epoch(0))[0][0]
    torch.testing.assert_close(plain.mean(dim=(0, 2, 3)), torch.zeros(s.channels), atol=1e-4, rtol=0)


def test_symmetric_label_noise_is_fixed_by_seed_and_always_wrong():
    from aace.data import symmetric_label_noise
    labels = torch.arange(1000) % 10
    noisy = symmetric_label_noise(labels, 0.4, 10, seed=3)
    assert (noisy != labels).sum() == 400 and noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(noisy, symmetric_label_noise(labels, 0.4, 10, seed=3))
    assert not torch.equal(noisy, symmetric_label_noise(labels, 0.4, 10, seed=4))


# ----------------------------------------------------------------------------- the long-tailed testbed (issue 34)

def test_long_tail_counts_follow_the_exponential_profile():
    from aace.data import long_tail_counts
    counts = long_tail_counts(500, 10, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert counts == [int(500 * 100 ** (-c / 9)) for c in range(10)]
    assert long_tail_counts(100, 10, 1000) == [max(1, int(100 * 1000 ** (-c / 9))) for c in range(10)]
    assert long_tail_counts(100, 10, 1000)[-1] == 1  # never an empty class


def test_the_long_tailed_subset_is_nested_in_the_balanced_one_and_validation_stays_balanced():
    from aace.batches import prepare_data
    from aace.config import profile_config
    config = profile_config("smoke", train_subset=500, val_subset=200, imbalance_ratio=10.0)
    balanced = profile_config("smoke", train_subset=500, val_subset=200)
    _, train, test, val, _ = prepare_data(config, torch.device("cpu"))
    _, train_b, test_b, val_b, _ = prepare_data(balanced, torch.device("cpu"))
    assert torch.bincount(train.labels, minlength=10).tolist() == config.class_counts() == \
        [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    assert torch.bincount(val.labels, minlength=10).tolist() == [20] * 10
    assert torch.equal(val.labels, val_b.labels) and torch.equal(test.labels, test_b.labels)
    # every long-tailed image is one of the balanced subset's (the same images, a subset of them)
    rows_b = {tuple(x.flatten().tolist()) for x in train_b.images}
    assert all(tuple(x.flatten().tolist()) in rows_b for x in train.images)
    again = prepare_data(config, torch.device("cpu"))[1]
    assert torch.equal(again.images, train.images)  # drawn by the run's data seed


@pytest.mark.parametrize("settings, words", [
    (dict(imbalance_ratio=0.5), "RunConfig.imbalance_ratio: expected a finite number >= 1"),
    (dict(imbalance_ratio=float("inf")), "RunConfig.imbalance_ratio: expected a finite number >= 1"),
    (dict(imbalance_ratio=10.0, train_subset=None), "1 unless train_subset is set to a multiple of the 10 classes"),
    (dict(imbalance_ratio=10.0, train_subset=255), "train_subset is 255"),
])
def test_a_bad_imbalance_ratio_is_named(settings, words):
    from aace.config import profile_config
    with pytest.raises(ValueError, match=words):
        profile_config("smoke", **settings)


def test_the_imbalance_ratio_is_part_of_the_runs_hash_and_feeds_the_weighted_loss():
    from aace.config import profile_config
    balanced, tailed = profile_config("smoke"), profile_config("smoke", train_subset=250, imbalance_ratio=10.0)
    assert balanced.run_hash("cpu", 1) == profile_config("smoke", imbalance_ratio=1).run_hash("cpu", 1)
    assert tailed.run_hash("cpu", 1) != balanced.run_hash("cpu", 1)
    assert balanced.loss_options("exp_weighted_ce") == {"class_counts": None}
    assert tailed.loss_options("exp_weighted_ce")["class_counts"] == tailed.class_counts()
