r"""Builds a TFDS dataset offline from official files that were copied in by hand.

The machines this project runs on have no internet, so `tfds.load` cannot download.
This tool checks the official files, then writes the same TFDS dataset (name,
version, features, train/test splits) that `tfds.load(..., download=True)` would
have produced, so that `mixtrain_tf.data.load` (and `tfds.load(name,
data_dir=DATA_DIR, download=False)`) read it.

Expected files in --source:
  mnist, fashion_mnist: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
    t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz
  cifar10: cifar-10-binary.tar.gz (the "binary version"), or its extracted
    data_batch_1.bin ... data_batch_5.bin and test_batch.bin (in --source or in
    --source/cifar-10-batches-bin).

Checksums: every file is checked against the SHA-256 of the official file that
TensorFlow Datasets registers for it. An MNIST or Fashion-MNIST .gz file that a
redistributor re-compressed (Debian's dataset-fashion-mnist package rewrites the
gzip header) also passes when its decompressed content has the official content's
SHA-256. No official checksum exists for CIFAR-10's extracted .bin files: only their
sizes are checked; the archive is checked in full. --skip_checksums turns all of
this off (for tests with synthetic files).

Example:
  python tools/prepare_data.py --dataset fashion_mnist \
      --source /usr/share/datasets/fashion-mnist --data_dir ~/tensorflow_datasets
  TFDS_DATA_DIR=~/tensorflow_datasets python -c \
      'from mixtrain_tf import data; data.load("fashion_mnist", "test")'
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
import sys
import tempfile
import zlib
from collections.abc import Callable, Mapping
from typing import BinaryIO

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging


@dataclasses.dataclass(frozen=True)
class OfficialFile:
  """An official file and its known checksums.

  Attributes:
    name: File name as published.
    size: Size in bytes as published.
    sha256: SHA-256 of the file as published (TFDS's registered checksum).
    content_sha256: SHA-256 of the decompressed content of a gzip file, or None
      where it is not known.
  """

  name: str
  size: int
  sha256: str
  content_sha256: str | None = None


# sha256 and size: tensorflow_datasets/url_checksums/{mnist,fashion_mnist,cifar10}.txt.
# content_sha256: the decompressed official files. MNIST's equal the IDX content of
# the md5-checked TFDS build in ../shared/tfds. Debian's dataset-fashion-mnist files
# differ from the official ones only in their gzip header (restoring it reproduces
# the official sha256 and md5), so their content gives Fashion-MNIST's.
OFFICIAL_FILES: Mapping[str, Mapping[str, OfficialFile]] = {
    "mnist": {
        "train_images": OfficialFile(
            "train-images-idx3-ubyte.gz", 9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "train_labels": OfficialFile(
            "train-labels-idx1-ubyte.gz", 28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        "test_images": OfficialFile(
            "t10k-images-idx3-ubyte.gz", 1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "test_labels": OfficialFile(
            "t10k-labels-idx1-ubyte.gz", 4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
    "fashion_mnist": {
        "train_images": OfficialFile(
            "train-images-idx3-ubyte.gz", 26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train_labels": OfficialFile(
            "train-labels-idx1-ubyte.gz", 29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "test_images": OfficialFile(
            "t10k-images-idx3-ubyte.gz", 4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "test_labels": OfficialFile(
            "t10k-labels-idx1-ubyte.gz", 5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    "cifar10": {
        "archive": OfficialFile(
            "cifar-10-binary.tar.gz", 170052171,
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    },
}  # fmt: skip

_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR10_TEST_FILES = ("test_batch.bin",)
_CIFAR10_BIN_SIZE = 10000 * (1 + 32 * 32 * 3)
_CIFAR10_ARCHIVE_DIR = "cifar-10-batches-bin"
_CIFAR10_LABELS = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class PrepareDataError(Exception):
  """A source file is missing or fails its check; the message names the file."""


def _sha256(path: pathlib.Path, opener: Callable[..., BinaryIO] = open) -> str:
  digest = hashlib.sha256()
  with opener(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _content_sha256(path: pathlib.Path) -> str | None:
  """Returns the SHA-256 of a gzip file's decompressed content; None if not gzip."""
  try:
    return _sha256(path, gzip.open)
  except (OSError, EOFError, zlib.error):
    return None


def verify_file(path: pathlib.Path, official: OfficialFile) -> None:
  """Checks `path` against the official file's SHA-256 (or content SHA-256).

  Args:
    path: File to check.
    official: Its official description.

  Raises:
    PrepareDataError: The file is missing or no checksum matches.
  """
  if not path.is_file():
    raise PrepareDataError(
        f"missing {path}: copy the official {official.name} ({official.size} bytes, "
        f"sha256 {official.sha256}) there"
    )
  got = _sha256(path)
  if got == official.sha256:
    return
  expected = f"sha256 {official.sha256}"
  if official.content_sha256 is not None:
    if _content_sha256(path) == official.content_sha256:
      return
    expected += f" (or decompressed content sha256 {official.content_sha256})"
  raise PrepareDataError(
      f"checksum mismatch for {path}: expected {expected} of the official "
      f"{official.name}, got sha256 {got}; copy the official file again"
  )


def _idx_count(path: pathlib.Path, magic: int) -> int:
  """Returns the number of items in an (uncompressed) IDX file."""
  header = np.fromfile(path, dtype=">u4", count=2)
  if header.size < 2 or header[0] != magic:
    raise PrepareDataError(f"{path} is not an IDX file with magic number {magic}")
  return int(header[1])


class _LocalFiles:
  """Builder mixin: the source files come from the constructor, not a download."""

  def __init__(self, *, files: Mapping[str, pathlib.Path], **kwargs):
    self._files = dict(files)
    super().__init__(**kwargs)


class _LocalIdxFiles(_LocalFiles):
  """Makes an MNIST-style TFDS builder read the four local IDX .gz files."""

  def _split_generators(self, dl_manager):
    paths = dl_manager.extract(self._files)
    return {
        split: self._generate_examples(
            num_examples=_idx_count(paths[f"{split}_images"], 2051),
            data_path=paths[f"{split}_images"],
            label_path=paths[f"{split}_labels"],
        )
        for split in ("train", "test")
    }


class _OfflineMnist(_LocalIdxFiles, tfds.image_classification.MNIST,
                    skip_registration=True):
  name = "mnist"


class _OfflineFashionMnist(_LocalIdxFiles, tfds.image_classification.FashionMNIST,
                           skip_registration=True):
  name = "fashion_mnist"


class _OfflineCifar10(_LocalFiles, tfds.image_classification.Cifar10,
                      skip_registration=True):
  """Reads CIFAR-10's binary archive, or its extracted .bin files, from disk."""

  name = "cifar10"

  def _split_generators(self, dl_manager):
    if "archive" in self._files:
      batches = dl_manager.extract(self._files["archive"]) / _CIFAR10_ARCHIVE_DIR
      files = {name: batches / name
               for name in _CIFAR10_TRAIN_FILES + _CIFAR10_TEST_FILES}
    else:
      files = self._files
    self.info.features["label"].names = list(_CIFAR10_LABELS)
    return {
        "train": self._generate_examples(
            "train_", [files[name] for name in _CIFAR10_TRAIN_FILES]),
        "test": self._generate_examples(
            "test_", [files[name] for name in _CIFAR10_TEST_FILES]),
    }


_BUILDERS = {
    "mnist": _OfflineMnist,
    "fashion_mnist": _OfflineFashionMnist,
    "cifar10": _OfflineCifar10,
}


def _cifar10_source_files(source: pathlib.Path,
                          verify: bool) -> dict[str, pathlib.Path]:
  """Finds (and checks) the CIFAR-10 archive or its extracted .bin files."""
  official = OFFICIAL_FILES["cifar10"]["archive"]
  archive = source / official.name
  if archive.is_file():
    if verify:
      verify_file(archive, official)
    return {"archive": archive}
  names = _CIFAR10_TRAIN_FILES + _CIFAR10_TEST_FILES
  for folder in (source, source / _CIFAR10_ARCHIVE_DIR):
    if (folder / names[0]).is_file():
      break
  else:
    raise PrepareDataError(
        f"missing {archive}: copy the official {official.name} ({official.size} "
        f"bytes, sha256 {official.sha256}) there, or its extracted "
        f"{', '.join(names)}"
    )
  files = {name: folder / name for name in names}
  for path in files.values():
    if not path.is_file():
      raise PrepareDataError(
          f"missing {path}: copy the official extracted CIFAR-10 file there")
    if verify and path.stat().st_size != _CIFAR10_BIN_SIZE:
      raise PrepareDataError(
          f"size mismatch for {path}: expected {_CIFAR10_BIN_SIZE} bytes (official "
          f"CIFAR-10 binary batch), got {path.stat().st_size}"
      )
  if verify:
    logging.warning(
        "No official checksum exists for extracted CIFAR-10 files: checked sizes "
        "only. Use %s for a checksum-verified build.", official.name)
  return files


def prepare(
    dataset: str,
    source: str | pathlib.Path,
    data_dir: str | pathlib.Path,
    verify_checksums: bool = True,
) -> pathlib.Path:
  """Checks the official files in `source` and writes the TFDS dataset.

  Does nothing when `data_dir` already holds the dataset.

  Args:
    dataset: "mnist", "fashion_mnist" or "cifar10".
    source: Directory holding the official files.
    data_dir: TFDS data directory to write to.
    verify_checksums: Check the files against the official checksums.

  Returns:
    The directory of the prepared dataset version, e.g. `data_dir/mnist/3.0.1`.

  Raises:
    PrepareDataError: A file is missing or fails its check.
    ValueError: `dataset` is not one this tool builds.
  """
  if dataset not in _BUILDERS:
    raise ValueError(f"cannot build {dataset!r}; supported: {', '.join(_BUILDERS)}")
  builder_cls = _BUILDERS[dataset]
  source, data_dir = pathlib.Path(source), pathlib.Path(data_dir)
  version_dir = data_dir / dataset / str(builder_cls.VERSION)
  if (version_dir / "dataset_info.json").is_file():
    logging.info("%s is already in %s; delete that folder to rebuild it.", dataset,
                 version_dir)
    return version_dir

  if dataset == "cifar10":
    files = _cifar10_source_files(source, verify_checksums)
  else:
    files = {key: source / f.name for key, f in OFFICIAL_FILES[dataset].items()}
    for key, path in files.items():
      if verify_checksums:
        verify_file(path, OFFICIAL_FILES[dataset][key])
      elif not path.is_file():
        raise PrepareDataError(f"missing {path}")

  builder = builder_cls(files=files, data_dir=data_dir)
  with tempfile.TemporaryDirectory() as extract_dir:
    builder.download_and_prepare(
        download_dir=extract_dir,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )

  # Read the result back through the registered TFDS builder, as `tfds.load` does.
  written = tfds.builder(dataset, data_dir=data_dir)
  for split in ("train", "test"):
    next(iter(written.as_dataset(split=split).take(1)))
  sizes = ", ".join(f"{split}: {written.info.splits[split].num_examples}"
                    for split in ("train", "test"))
  logging.info("Prepared %s in %s (%s).", dataset, written.data_dir, sizes)
  return pathlib.Path(written.data_dir)


def define_flags() -> None:
  """Defines the command-line flags (only when run as a script)."""
  flags.DEFINE_enum("dataset", None, list(_BUILDERS), "Dataset to build.")
  flags.DEFINE_string("source", None,
                      "Directory holding the official files, copied in by hand.")
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write to (then "
                      "pass the same --data_dir to training).")
  flags.DEFINE_bool("skip_checksums", False,
                    "Build from files that fail the official checksums (for tests "
                    "with synthetic files; never for results).")
  flags.mark_flags_as_required(["dataset", "source", "data_dir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  args = flags.FLAGS
  try:
    path = prepare(args.dataset, args.source, args.data_dir,
                   verify_checksums=not args.skip_checksums)
  except PrepareDataError as e:
    sys.exit(f"error: {e}")
  print(f"Prepared {args.dataset} in {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
