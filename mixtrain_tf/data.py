"""Input pipelines for MNIST, Fashion-MNIST, CIFAR-10 and Tiny ImageNet (ImageNet-200).

Every dataset yields `(image, label)` pairs: `image` is float32 NHWC in [0, 1] (pixel
value / 255; any mean/std normalization belongs inside the network, so that bounds
flow through it) and `label` is int32.

Splits:
  * "train": the official training split minus the held-out validation tail.
  * "validation": the last `validation_size` examples of the official training split,
    disjoint from "train".
  * "test": the official test split (for ImageNet-200, the official labelled "val"
    images, since Tiny ImageNet's own test labels are not public).

MNIST, Fashion-MNIST and CIFAR-10 are read with TensorFlow Datasets from a local
TFDS data directory and are never downloaded (build them offline with
`tools/prepare_data.py`). ImageNet-200 is read from a Tiny ImageNet folder in its
official layout; its label is the index of the image's wnid in the sorted lines of
`wnids.txt`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import tensorflow as tf
import tensorflow_datasets as tfds

DATASETS = ("mnist", "fashion_mnist", "cifar10", "imagenet200")
SPLITS = ("train", "validation", "test")

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DEFAULT_TFDS_DIR = _REPO_ROOT.parent / "shared" / "tfds"
_DEFAULT_TINY_IMAGENET_DIR = (
    _REPO_ROOT.parent / "shared" / "data" / "tiny-imagenet-200-mini")


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
  """Static description of a dataset.

  Attributes:
    input_shape: Image shape (height, width, channels).
    num_classes: Number of labels.
    crop_padding: Zero padding before the random crop back to `input_shape` in
      augmentation; 0 disables the crop.
    flip: Whether augmentation flips images horizontally at random.
  """

  input_shape: tuple[int, int, int]
  num_classes: int
  crop_padding: int = 0
  flip: bool = False


_SPECS = {
    "mnist": _DatasetSpec((28, 28, 1), 10),
    "fashion_mnist": _DatasetSpec((28, 28, 1), 10),
    "cifar10": _DatasetSpec((32, 32, 3), 10, crop_padding=4, flip=True),
    "imagenet200": _DatasetSpec((64, 64, 3), 200, flip=True),
}


class DataNotFoundError(FileNotFoundError):
  """A dataset is not where it was looked for; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Splits:
  """Train, validation and test pipelines of one dataset.

  Attributes:
    train: Training examples (validation tail removed).
    validation: Held-out tail of the official training split, or None when
      `validation_size` is 0.
    test: Official test split.
  """

  train: tf.data.Dataset
  validation: tf.data.Dataset | None
  test: tf.data.Dataset


def _spec(name: str) -> _DatasetSpec:
  if name not in _SPECS:
    raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}")
  return _SPECS[name]


def input_shape(name: str) -> tuple[int, int, int]:
  """Returns the image shape (height, width, channels) of dataset `name`."""
  return _spec(name).input_shape


def num_classes(name: str) -> int:
  """Returns the number of classes of dataset `name`."""
  return _spec(name).num_classes


def default_data_dir(name: str) -> pathlib.Path:
  """Returns the directory `load` reads dataset `name` from when none is given.

  For the TFDS datasets: `$TFDS_DATA_DIR`, else `../shared/tfds` next to the
  repository. For "imagenet200": `$TINY_IMAGENET_DIR`, else
  `../shared/data/tiny-imagenet-200-mini` next to the repository.

  Args:
    name: One of `DATASETS`.

  Returns:
    The default data directory.
  """
  _spec(name)
  if name == "imagenet200":
    return pathlib.Path(os.environ.get("TINY_IMAGENET_DIR", _DEFAULT_TINY_IMAGENET_DIR))
  return pathlib.Path(os.environ.get("TFDS_DATA_DIR", _DEFAULT_TFDS_DIR))


def load(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = 50,
    shuffle: bool = False,
    augment: bool = False,
    max_examples: int | None = None,
    seed: int = 0,
    drop_remainder: bool = False,
    validation_size: int = 0,
) -> tf.data.Dataset:
  """Builds the input pipeline of one split.

  Args:
    name: One of `DATASETS`.
    split: "train", "validation" or "test".
    data_dir: For mnist, fashion_mnist and cifar10, a TFDS data directory (holding
      e.g. `mnist/3.0.1/`); for imagenet200, the Tiny ImageNet folder that holds
      `wnids.txt`. None means `default_data_dir(name)`.
    batch_size: Examples per batch; None leaves the dataset unbatched.
    shuffle: Reshuffle the whole split every epoch.
    augment: Apply the dataset's training augmentation (CIFAR-10: zero-pad 4 and
      random 32x32 crop, then random horizontal flip; ImageNet-200: random
      horizontal flip; MNIST and Fashion-MNIST: none). Draws differ every epoch.
    max_examples: Keep only the first `max_examples` examples of the split (after
      the validation tail is held out), for quick runs.
    seed: Seed of shuffling and augmentation.
    drop_remainder: Drop the last batch when it is smaller than `batch_size`.
    validation_size: Number of examples held out from the end of the official
      training split; "train" excludes them and "validation" is exactly them.

  Returns:
    A dataset of `(images, labels)`: float32 `[batch, H, W, C]` in [0, 1] and int32
    `[batch]` (without the batch dimension when `batch_size` is None).

  Raises:
    DataNotFoundError: The dataset is not in `data_dir`.
    ValueError: Unknown dataset or split, or a bad `validation_size`.
  """
  spec = _spec(name)
  data_dir = _checked_data_dir(name, split, validation_size, data_dir)
  read = _read_tiny_imagenet if name == "imagenet200" else _read_tfds
  examples = read(name, data_dir, split, validation_size, max_examples, shuffle, seed)
  examples = examples.map(_to_float_image, num_parallel_calls=tf.data.AUTOTUNE)
  if augment and (spec.crop_padding or spec.flip):
    examples = _augment(examples, spec, seed)
  if batch_size is not None:
    examples = examples.batch(
        batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE
    )
  return examples.prefetch(tf.data.AUTOTUNE)


def num_examples(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
    validation_size: int = 0,
) -> int:
  """How many examples `load` yields with the same arguments, without reading them.

  For progress bars with a total (a tf.data pipeline that is batched and re-batched
  no longer knows its length). Raises as `load` does.
  """
  _spec(name)
  data_dir = _checked_data_dir(name, split, validation_size, data_dir)
  if name == "imagenet200":
    official = len(_tiny_imagenet_pairs(name, data_dir, split))
  else:
    splits = _tfds_builder(name, data_dir).info.splits
    official = splits[_tfds_split(split)].num_examples
  start, stop = _example_range(split, official, validation_size, max_examples, name)
  return stop - start


def _checked_data_dir(name: str, split: str, validation_size: int,
                      data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """Checks `split` and `validation_size`; returns the data directory to read."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; supported: {', '.join(SPLITS)}")
  if validation_size < 0:
    raise ValueError(f"validation_size must be >= 0, got {validation_size}")
  if split == "validation" and validation_size == 0:
    raise ValueError("split 'validation' needs validation_size > 0")
  return pathlib.Path(data_dir) if data_dir is not None else default_data_dir(name)


def load_splits(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 50,
    validation_size: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    augment: bool = False,
    shuffle: bool = True,
    seed: int = 0,
) -> Splits:
  """Builds the train (shuffled, optionally augmented), validation and test pipelines.

  Args:
    name: One of `DATASETS`.
    data_dir: As in `load`.
    batch_size: Examples per batch; the last batch of each split may be smaller.
    validation_size: Examples held out from the end of the training split.
    max_train_examples: Keep only the first examples of the training split.
    max_eval_examples: Keep only the first examples of validation and test.
    augment: Augment the training split (see `load`).
    shuffle: Reshuffle the training split every epoch.
    seed: Seed of shuffling and augmentation.

  Returns:
    The three pipelines; `validation` is None when `validation_size` is 0.
  """
  common = dict(data_dir=data_dir, batch_size=batch_size, seed=seed,
                validation_size=validation_size)
  train = load(name, "train", shuffle=shuffle, augment=augment,
               max_examples=max_train_examples, **common)
  validation = (load(name, "validation", max_examples=max_eval_examples, **common)
                if validation_size else None)
  test = load(name, "test", max_examples=max_eval_examples, **common)
  return Splits(train=train, validation=validation, test=test)


def _example_range(split: str, num_official: int, validation_size: int,
                   max_examples: int | None, name: str) -> tuple[int, int]:
  """Returns [start, stop) of `split` inside its official split of `num_official`."""
  if split == "test":
    start, stop = 0, num_official
  else:
    if validation_size >= num_official:
      raise ValueError(
          f"validation_size={validation_size} leaves no training data: the {name} "
          f"training split has {num_official} examples"
      )
    cut = num_official - validation_size
    start, stop = (cut, num_official) if split == "validation" else (0, cut)
  if max_examples is not None:
    stop = min(stop, start + max_examples)
  return start, stop


def _read_tfds(
    name: str,
    data_dir: pathlib.Path,
    split: str,
    validation_size: int,
    max_examples: int | None,
    shuffle: bool,
    seed: int,
) -> tf.data.Dataset:
  """Reads a TFDS split as (uint8 image, label) pairs, cached in memory."""
  builder = _tfds_builder(name, data_dir)
  official = _tfds_split(split)
  start, stop = _example_range(split, builder.info.splits[official].num_examples,
                               validation_size, max_examples, name)
  examples = builder.as_dataset(
      split=f"{official}[{start}:{stop}]", as_supervised=True, shuffle_files=False
  ).cache()
  if shuffle:
    examples = examples.shuffle(stop - start, seed=seed,
                                reshuffle_each_iteration=True)
  return examples


def _tfds_builder(name: str, data_dir: pathlib.Path):
  """The prepared TFDS builder of `name` in `data_dir`; DataNotFoundError if absent."""
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise DataNotFoundError(
        f"dataset {name!r} was not found in {data_dir} (no "
        f"{builder.data_dir}/dataset_info.json). Fix: pass --data_dir or set "
        f"TFDS_DATA_DIR to a TFDS data directory that holds {name}, or build it "
        f"offline from the official files: python tools/prepare_data.py --dataset "
        f"{name} --source DIR_WITH_OFFICIAL_FILES --data_dir {data_dir}"
    )
  return builder


def _tfds_split(split: str) -> str:
  """The official TFDS split that `split` is cut from."""
  return "test" if split == "test" else "train"


def _read_tiny_imagenet(
    name: str,
    root: pathlib.Path,
    split: str,
    validation_size: int,
    max_examples: int | None,
    shuffle: bool,
    seed: int,
) -> tf.data.Dataset:
  """Reads a Tiny ImageNet split as (uint8 image, label) pairs.

  Labels are the index of an image's wnid in the sorted lines of `wnids.txt`. The
  training images `train/<wnid>/images/*.JPEG` are listed round-robin over classes
  (every class's first file in sorted order, then every class's second, ...), so the
  held-out validation tail covers all classes evenly. The test split is
  `val/images/` with labels from `val/val_annotations.txt`, in that file's order.
  """
  pairs = _tiny_imagenet_pairs(name, root, split)
  start, stop = _example_range(split, len(pairs), validation_size, max_examples,
                               name)
  pairs = pairs[start:stop]
  files = tf.data.Dataset.from_tensor_slices((
      tf.constant([os.fspath(path) for path, _ in pairs], tf.string),
      tf.constant([label for _, label in pairs], tf.int32),
  ))
  # Shuffle file names rather than decoded images: the buffer stays small.
  if shuffle:
    files = files.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)
  return files.map(_read_jpeg, num_parallel_calls=tf.data.AUTOTUNE)


def _tiny_imagenet_pairs(name: str, root: pathlib.Path, split: str) -> list:
  """(path, label) of the official split that `split` is cut from, in read order."""
  wnids_path = root / "wnids.txt"
  if not wnids_path.is_file():
    raise DataNotFoundError(
        f"dataset {name!r} (Tiny ImageNet) was not found: {wnids_path} does not "
        "exist. Fix: pass --data_dir or set TINY_IMAGENET_DIR to the unpacked "
        "tiny-imagenet-200 folder in its official layout (wnids.txt, "
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt)."
    )
  wnids = sorted(set(wnids_path.read_text().split()))
  return (_tiny_imagenet_test_files(root, wnids) if split == "test"
          else _tiny_imagenet_train_files(root, wnids))


def _tiny_imagenet_test_files(root: pathlib.Path, wnids: list[str]) -> list:
  """(path, label) of val/images/ in val_annotations.txt order."""
  label_of = {wnid: label for label, wnid in enumerate(wnids)}
  annotations = root / "val" / "val_annotations.txt"
  if not annotations.is_file():
    raise DataNotFoundError(
        f"Tiny ImageNet in {root} has no {annotations}: the test split needs the "
        "official val/images/ and val/val_annotations.txt."
    )
  rows = [line.split("\t")[:2] for line in annotations.read_text().splitlines()
          if line]
  return [(root / "val" / "images" / file, label_of[wnid]) for file, wnid in rows]


def _tiny_imagenet_train_files(root: pathlib.Path, wnids: list[str]) -> list:
  """(path, label) of train/<wnid>/images/*.JPEG, round-robin over classes."""
  per_class = [sorted((root / "train" / wnid / "images").glob("*.JPEG"))
               for wnid in wnids]
  longest = max(len(files) for files in per_class)
  if longest == 0:
    raise DataNotFoundError(
        f"Tiny ImageNet in {root} has no training images "
        "train/<wnid>/images/*.JPEG."
    )
  return [(files[i], label) for i in range(longest)
          for label, files in enumerate(per_class) if i < len(files)]


def _read_jpeg(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  # channels=3 also expands the grayscale JPEGs that Tiny ImageNet contains.
  image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
  return tf.ensure_shape(image, _SPECS["imagenet200"].input_shape), label


def _to_float_image(image: tf.Tensor,
                    label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def _augment(images: tf.data.Dataset, spec: _DatasetSpec,
             seed: int) -> tf.data.Dataset:
  """Applies random crop and/or flip with stateless ops, new draws every epoch."""
  seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

  def augment_one(example, pair_seed):
    image, label = example
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(pair_seed, 2))
    if spec.crop_padding:
      height, width, _ = spec.input_shape
      image = tf.image.pad_to_bounding_box(
          image,
          spec.crop_padding,
          spec.crop_padding,
          height + 2 * spec.crop_padding,
          width + 2 * spec.crop_padding,
      )
      image = tf.image.stateless_random_crop(image, spec.input_shape,
                                             seed=crop_seed)
    if spec.flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image, label

  return tf.data.Dataset.zip(images, seeds).map(
      augment_one, num_parallel_calls=tf.data.AUTOTUNE
  )
