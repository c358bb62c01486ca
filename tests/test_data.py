import numpy as np
import pytest

from provae.data import DataError, load_prepared, parse_idx, prepare, save_prepared

from conftest import write_idx_mirror


def test_parse_idx_reads_header_and_data():
    raw = bytes([0, 0, 8, 3]) + np.array([2, 2, 3], ">u4").tobytes() + bytes(range(12))
    assert parse_idx(raw, "x").tolist() == np.arange(12).reshape(2, 2, 3).tolist()


@pytest.mark.parametrize("raw, message", [
    (bytes([0, 0, 9, 1, 0, 0, 0, 1, 5]), "magic"),
    (bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + bytes(3), "header says shape"),
])
def test_parse_idx_rejects_bad_files(raw, message):
    with pytest.raises(DataError, match=message):
        parse_idx(raw, "x")


def test_mirror_round_trip_and_provenance(tmp_path):
    mirror = write_idx_mirror(tmp_path / "mirror", n_train=50, n_test=20)
    data = prepare("mnist", mirror, tmp_path / "downloads")
    assert data.train_images.shape == (50, 1, 28, 28) and data.test_labels.shape == (20,)
    assert data.provenance["counts"] == {"train": 50, "test": 20}
    assert data.provenance["genuine"] is False  # not the canonical MNIST bytes
    save_prepared(data, tmp_path / "p.npz")
    first = (tmp_path / "p.npz").read_bytes()
    save_prepared(data, tmp_path / "p.npz")
    assert (tmp_path / "p.npz").read_bytes() == first  # reproducible bytes: DVC sees no change
    loaded = load_prepared(tmp_path / "p.npz")
    assert loaded.provenance == data.provenance
    assert np.array_equal(loaded.train_images.numpy(), data.train_images.numpy())
    images = loaded.images("test")
    assert images.dtype.is_floating_point and 0 <= images.min() and images.max() <= 1


def test_mirror_without_checksums_is_rejected(tmp_path):
    mirror = write_idx_mirror(tmp_path / "mirror", n_train=10, n_test=10)
    (mirror / "mnist" / "SHA256SUMS").unlink()
    with pytest.raises(DataError, match="SHA256SUMS is missing"):
        prepare("mnist", mirror, tmp_path)


def test_missing_mirror_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="no folder cifar-10-batches-py/ or cifar10-jpeg/ for cifar10"):
        prepare("cifar10", tmp_path, tmp_path)


def test_missing_prepared_file_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run the data stage"):
        load_prepared(tmp_path / "nothing.npz")
