"""Tests of mixtrain_tf.data and tools/prepare_data.py on the shared datasets."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixtrain_tf import data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
TFDS_DIR = pathlib.Path(os.environ.get("TFDS_DATA_DIR", SHARED / "tfds"))
TINY_IMAGENET_DIR = pathlib.Path(os.environ.get(
    "TINY_IMAGENET_DIR", SHARED / "data" / "tiny-imagenet-200-mini"))
# Installed by Debian's package dataset-fashion-mnist (official files, re-gzipped).
DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")

PREPARE_DATA = REPO_ROOT / "tools" / "prepare_data.py"
_spec = importlib.util.spec_from_file_location("prepare_data", PREPARE_DATA)
prepare_data = sys.modules["prepare_data"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)

needs_tfds_data = pytest.mark.skipif(
    not (TFDS_DIR / "mnist").is_dir() or not (TFDS_DIR / "cifar10").is_dir(),
    reason=f"shared TFDS data (mnist, cifar10) not found in {TFDS_DIR}")
needs_tiny_imagenet = pytest.mark.skipif(
    not (TINY_IMAGENET_DIR / "wnids.txt").is_file(),
    reason=f"Tiny ImageNet subset not found in {TINY_IMAGENET_DIR}")
needs_debian_fashion_mnist = pytest.mark.skipif(
    not all((DEBIAN_FASHION_MNIST / f.name).is_file()
            for f in prepare_data.OFFICIAL_FILES["fashion_mnist"].values()),
    reason=f"Fashion-MNIST files not in {DEBIAN_FASHION_MNIST}; install them with "
    "`apt-get install dataset-fashion-mnist`")


def as_arrays(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates a batched dataset into (images, labels) arrays."""
  images, labels = zip(*tfds.as_numpy(dataset), strict=True)
  return np.concatenate(images), np.concatenate(labels)


def tfds_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a shared TFDS split as uint8 arrays, bypassing mixtrain_tf.data."""
  dataset = tfds.load(name, split=split, data_dir=TFDS_DIR, as_supervised=True)
  images, labels = zip(*tfds.as_numpy(dataset), strict=True)
  return np.stack(images), np.array(labels)


def num_examples(dataset: tf.data.Dataset) -> int:
  cardinality = int(dataset.cardinality())
  assert cardinality >= 0, "cardinality unknown"
  return cardinality


def assert_same_examples(images, labels, expected_images, expected_labels) -> None:
  """Compares [0, 1] float examples with uint8 ones, in any order.

  A TFDS build stores examples in hashed-key order, so both sides are sorted by
  (label, pixels) first.
  """
  images = np.round(images * 255).astype(np.uint8)
  order = np.lexsort((*images.reshape(len(images), -1).T[::-1], labels))
  expected_order = np.lexsort(
      (*expected_images.reshape(len(expected_images), -1).T[::-1], expected_labels))
  np.testing.assert_array_equal(images[order], expected_images[expected_order])
  np.testing.assert_array_equal(labels[order], expected_labels[expected_order])


def run_prepare_data(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.fspath(PREPARE_DATA), *args],
                        capture_output=True, text=True, check=False)


@pytest.mark.parametrize("name", [
    pytest.param("mnist", marks=needs_tfds_data),
    pytest.param("cifar10", marks=needs_tfds_data),
    pytest.param("imagenet200", marks=needs_tiny_imagenet),
])
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_load_shapes_dtypes_and_range(name, split):
  data_dir = TINY_IMAGENET_DIR if name == "imagenet200" else TFDS_DIR
  dataset = data.load(name, split, data_dir=data_dir, batch_size=4, max_examples=10,
                      validation_size=20)
  images, labels = as_arrays(dataset)

  assert [int(x.shape[0]) for x, _ in dataset] == [4, 4, 2]
  assert images.shape == (10, *data.input_shape(name))
  assert images.dtype == np.float32 and labels.dtype == np.int32
  assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
  assert 0 <= labels.min() and labels.max() < data.num_classes(name)


@pytest.mark.parametrize("name", [
    pytest.param("mnist", marks=needs_tfds_data),
    pytest.param("imagenet200", marks=needs_tiny_imagenet),
])
@pytest.mark.parametrize("split", data.SPLITS)
@pytest.mark.parametrize("max_examples", [None, 7])
def test_num_examples_is_the_count_load_yields(name, split, max_examples):
  kwargs = dict(data_dir=TINY_IMAGENET_DIR if name == "imagenet200" else TFDS_DIR,
                max_examples=max_examples, validation_size=20)
  counted = data.num_examples(name, split, **kwargs)

  if name == "mnist" and split == "train" and max_examples is None:
    assert counted == 60_000 - 20  # reading all of it would slow the suite
  else:
    loaded = data.load(name, split, batch_size=1000, **kwargs)
    assert counted == sum(int(y.shape[0]) for _, y in loaded)
  if max_examples is not None:
    assert counted == max_examples
  with pytest.raises(ValueError, match="validation_size > 0"):
    data.num_examples(name, "validation", data_dir=kwargs["data_dir"])


def test_input_shape_and_num_classes():
  assert [data.input_shape(name) for name in data.DATASETS] == [
      (28, 28, 1), (28, 28, 1), (32, 32, 3), (64, 64, 3)]
  assert [data.num_classes(name) for name in data.DATASETS] == [10, 10, 10, 200]
  with pytest.raises(ValueError, match="supported: mnist"):
    data.num_classes("svhn")


@needs_tfds_data
def test_validation_is_the_held_out_tail_of_train():
  kwargs = dict(data_dir=TFDS_DIR, batch_size=None, validation_size=500)
  train = data.load("mnist", "train", **kwargs)
  validation = data.load("mnist", "validation", **kwargs)
  train_head, _ = as_arrays(
      data.load("mnist", "train", max_examples=100, **kwargs).batch(100))
  val_images, val_labels = as_arrays(validation.batch(500))
  expected_val_images, expected_val_labels = tfds_arrays("mnist", "train[59500:]")

  assert num_examples(train) == 59500 and num_examples(validation) == 500
  np.testing.assert_array_equal(
      train_head, tfds_arrays("mnist", "train[:100]")[0] / np.float32(255))
  np.testing.assert_array_equal(val_images, expected_val_images / np.float32(255))
  np.testing.assert_array_equal(val_labels, expected_val_labels)
  # No held-out image occurs in the training split (pixel identity).
  val_keys = {image.tobytes() for image in val_images}
  for images, _ in tfds.as_numpy(train.batch(10000)):
    assert val_keys.isdisjoint(image.tobytes() for image in images)


@needs_tfds_data
def test_load_splits_shuffles_train_only():
  splits = data.load_splits("mnist", data_dir=TFDS_DIR, batch_size=100,
                            validation_size=100, max_train_examples=100,
                            max_eval_examples=100)
  ordered = data.load("mnist", "train", data_dir=TFDS_DIR, batch_size=100,
                      max_examples=100)
  epoch_1 = next(iter(splits.train))[1].numpy()
  epoch_2 = next(iter(splits.train))[1].numpy()
  ordered_labels = next(iter(ordered))[1].numpy()

  assert sorted(epoch_1) == sorted(ordered_labels)
  assert list(epoch_1) != list(ordered_labels)
  assert list(epoch_2) != list(epoch_1)
  assert len(as_arrays(splits.validation)[1]) == 100
  assert len(as_arrays(splits.test)[1]) == 100


@needs_tfds_data
def test_bad_validation_size_is_rejected():
  with pytest.raises(ValueError, match="needs validation_size > 0"):
    data.load("mnist", "validation", data_dir=TFDS_DIR)
  with pytest.raises(ValueError, match="leaves no training data"):
    data.load("mnist", "train", data_dir=TFDS_DIR, validation_size=60000)


@needs_tiny_imagenet
def test_imagenet200_labels_and_validation_cover_all_classes():
  wnids = sorted((TINY_IMAGENET_DIR / "wnids.txt").read_text().split())
  annotations = (TINY_IMAGENET_DIR / "val" / "val_annotations.txt").read_text()
  _, val_labels = as_arrays(data.load("imagenet200", "validation",
                                      data_dir=TINY_IMAGENET_DIR, validation_size=200))
  _, test_labels = as_arrays(data.load("imagenet200", "test",
                                       data_dir=TINY_IMAGENET_DIR, max_examples=3))

  assert sorted(val_labels) == list(range(200))
  assert list(test_labels) == [wnids.index(row.split("\t")[1])
                               for row in annotations.splitlines()[:3]]


@needs_tfds_data
def test_cifar10_augmentation_keeps_shape_and_range_and_changes_images():
  def pipeline(augment):
    return data.load("cifar10", "train", data_dir=TFDS_DIR, batch_size=50,
                     max_examples=50, augment=augment, seed=3)

  plain = next(iter(pipeline(False)))[0].numpy()
  augmented_pipeline = pipeline(True)
  epoch_1 = next(iter(augmented_pipeline))[0].numpy()
  epoch_2 = next(iter(augmented_pipeline))[0].numpy()

  assert epoch_1.shape == plain.shape == (50, 32, 32, 3)
  assert 0.0 <= epoch_1.min() and epoch_1.max() <= 1.0
  assert np.mean(np.any(epoch_1 != plain, axis=(1, 2, 3))) > 0.5
  # Crops shifted right of the zero-padded image start with a black column.
  assert np.any(np.all(epoch_1[:, :, 0, :] == 0.0, axis=(1, 2)))
  np.testing.assert_array_equal(epoch_1, next(iter(pipeline(True)))[0].numpy())
  assert np.any(epoch_2 != epoch_1)  # New draws every epoch.


@needs_tiny_imagenet
def test_imagenet200_augmentation_only_flips():
  kwargs = dict(data_dir=TINY_IMAGENET_DIR, batch_size=40, max_examples=40)
  plain, _ = as_arrays(data.load("imagenet200", "train", **kwargs))
  augmented, _ = as_arrays(data.load("imagenet200", "train", augment=True, **kwargs))

  flipped = np.any(augmented != plain, axis=(1, 2, 3))
  assert 0 < flipped.sum() < 40
  np.testing.assert_array_equal(augmented[flipped], plain[flipped][:, :, ::-1, :])


@needs_tfds_data
def test_mnist_augmentation_is_identity():
  kwargs = dict(data_dir=TFDS_DIR, batch_size=20, max_examples=20)
  np.testing.assert_array_equal(
      as_arrays(data.load("mnist", "train", augment=True, **kwargs))[0],
      as_arrays(data.load("mnist", "train", **kwargs))[0])


def test_missing_tfds_data_gives_instructions(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", os.fspath(tmp_path))
  with pytest.raises(data.DataNotFoundError) as error:
    data.load("cifar10", "train")
  message = str(error.value)

  assert isinstance(error.value, FileNotFoundError)
  assert "'cifar10'" in message and os.fspath(tmp_path) in message
  assert "TFDS_DATA_DIR" in message and "--data_dir" in message
  assert "python tools/prepare_data.py --dataset cifar10" in message


def test_missing_tiny_imagenet_gives_instructions(tmp_path):
  with pytest.raises(data.DataNotFoundError, match="TINY_IMAGENET_DIR") as error:
    data.load("imagenet200", "test", data_dir=tmp_path)
  assert os.fspath(tmp_path / "wnids.txt") in str(error.value)


@needs_debian_fashion_mnist
def test_prepare_data_builds_fashion_mnist_from_debian_files(tmp_path):
  # Debian re-gzipped the files: they pass through their decompressed content.
  official = prepare_data.OFFICIAL_FILES["fashion_mnist"]["test_labels"]
  assert prepare_data._sha256(DEBIAN_FASHION_MNIST / official.name) != official.sha256

  path = prepare_data.prepare("fashion_mnist", DEBIAN_FASHION_MNIST, tmp_path)
  train = data.load("fashion_mnist", "train", data_dir=tmp_path, batch_size=None)
  test_images, test_labels = as_arrays(
      data.load("fashion_mnist", "test", data_dir=tmp_path, batch_size=1000))

  assert path == tmp_path / "fashion_mnist" / "3.0.1"
  assert num_examples(train) == 60000 and len(test_labels) == 10000
  assert test_images.shape == (10000, 28, 28, 1) and test_images.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)
  assert set(as_arrays(train.take(1000).batch(1000))[1]) == set(range(10))


def write_idx_gz(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
  header = np.array([magic, *array.shape], dtype=">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@needs_tfds_data
def test_prepare_data_mnist_checksums_and_skip_checksums(tmp_path):
  source, out = tmp_path / "source", tmp_path / "tfds"
  source.mkdir()
  arrays = {}
  for split, prefix, count in (("train", "train", 30), ("test", "t10k", 20)):
    arrays[split] = tfds_arrays("mnist", f"{split}[:{count}]")
    write_idx_gz(source / f"{prefix}-images-idx3-ubyte.gz", arrays[split][0][..., 0],
                 2051)
    write_idx_gz(source / f"{prefix}-labels-idx1-ubyte.gz", arrays[split][1], 2049)
  train_images = source / "train-images-idx3-ubyte.gz"
  args = ("--dataset=mnist", f"--source={source}", f"--data_dir={out}")

  wrong = run_prepare_data(*args)
  assert wrong.returncode != 0
  assert wrong.stderr.strip() == (
      f"error: checksum mismatch for {train_images}: expected sha256 "
      "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609 (or "
      "decompressed content sha256 "
      "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db) of the "
      f"official train-images-idx3-ubyte.gz, got sha256 "
      f"{prepare_data._sha256(train_images)}; copy the official file again")
  assert not (out / "mnist").exists()

  built = run_prepare_data(*args, "--skip_checksums")
  assert built.returncode == 0, built.stderr
  for split in ("train", "test"):
    assert_same_examples(*as_arrays(data.load("mnist", split, data_dir=out)),
                         *arrays[split])

  train_images.unlink()
  missing = run_prepare_data("--dataset=mnist", f"--source={source}",
                             f"--data_dir={tmp_path / 'elsewhere'}")
  assert missing.returncode != 0
  assert missing.stderr.strip() == (
      f"error: missing {train_images}: copy the official train-images-idx3-ubyte.gz "
      "(9912422 bytes, sha256 "
      "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609) there")


def test_prepare_data_rejects_a_file_that_is_not_gzip(tmp_path):
  official = prepare_data.OFFICIAL_FILES["mnist"]["train_labels"]
  (tmp_path / official.name).write_bytes(b"not a gzip file")
  with pytest.raises(prepare_data.PrepareDataError, match="checksum mismatch for"):
    prepare_data.verify_file(tmp_path / official.name, official)


@needs_tfds_data
def test_prepare_data_cifar10_archive_and_extracted_files(tmp_path):
  images, labels = tfds_arrays("cifar10", "train[:12]")
  records = np.concatenate(
      [labels[:, None], images.transpose(0, 3, 1, 2).reshape(12, -1)], axis=1)
  batches = tmp_path / "cifar-10-batches-bin"
  batches.mkdir()
  names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
  for i, name in enumerate(names):
    records[2 * i:2 * i + 2].astype(np.uint8).tofile(batches / name)
  with tarfile.open(tmp_path / "cifar-10-binary.tar.gz", "w:gz") as archive:
    archive.add(batches, arcname=batches.name)

  with pytest.raises(prepare_data.PrepareDataError, match="c4a38c50a1bc5f3a") as error:
    prepare_data.prepare("cifar10", tmp_path, tmp_path / "a")
  assert str(error.value).startswith(
      f"checksum mismatch for {tmp_path / 'cifar-10-binary.tar.gz'}")
  with pytest.raises(prepare_data.PrepareDataError) as error:
    prepare_data.prepare("cifar10", batches, tmp_path / "b")
  assert str(error.value).startswith(
      f"size mismatch for {batches / 'data_batch_1.bin'}: expected 30730000 bytes")

  for source, out in ((tmp_path, tmp_path / "a"), (batches, tmp_path / "b")):
    path = prepare_data.prepare("cifar10", source, out, verify_checksums=False)
    assert path == out / "cifar10" / "3.0.2"
    # A second call finds the dataset and needs no source files.
    assert prepare_data.prepare("cifar10", tmp_path / "nothing", out) == path
    for split, part in (("train", slice(0, 10)), ("test", slice(10, 12))):
      assert_same_examples(*as_arrays(data.load("cifar10", split, data_dir=out)),
                           images[part], labels[part])
