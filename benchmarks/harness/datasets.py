"""Data for the noisy-label benchmarks: digits, CIFAR via TFDS, label noise.

Everything returns plain NumPy arrays; training code moves them to the device
once and gathers batches there, so a whole run can be a ``jax.lax.scan``.

* ``load_digits``: scikit-learn's 8x8 handwritten digits (ships offline).
* ``load_tfds``: ``cifar100``, ``cifar100_n`` or ``cifar10_n`` through
  ``tfds.data_source``. CIFAR-N carry real human label noise in extra label
  features (``noise_label``; ``worse_label``, ``aggre_label``,
  ``random_label1``); CIFAR-N must be downloaded by hand (see
  :class:`ManualDownloadError`). Preparing any of these builders (once) needs
  TensorFlow: ``pip install -e ".[cifar]"``. Reading them afterwards does not.
* ``symmetric_label_noise``: move exactly ``round(rate * n)`` labels to a
  uniformly random other class. ``examples/`` repeat it inline, and
  ``tests/docs/test_examples.py`` checks that they corrupt the same fraction.
* ``class_balanced_microbatches``: indices of microbatches that each hold the
  same number of examples of every class, as in the authors' code.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """A labelled train/validation split held in memory.

  Attributes:
    train_x: ``[n_train, H, W, C]`` images (float32 in [0, 1], or uint8).
    train_y: ``[n_train]`` int32 training labels, as the model sees them
      (possibly noisy).
    train_clean_y: ``[n_train]`` int32 original labels.
    val_x: ``[n_val, H, W, C]`` validation images.
    val_y: ``[n_val]`` int32 clean validation labels.
    num_classes: the number of classes.
  """

  train_x: np.ndarray
  train_y: np.ndarray
  train_clean_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  num_classes: int

  @property
  def corrupted(self) -> np.ndarray:
    """Bool ``[n_train]``: training labels that differ from the clean ones."""
    return self.train_y != self.train_clean_y


# Label features of the TFDS builders: name -> (label feature choices, clean).
TFDS_LABELS = {
  "cifar100": (("label",), "label"),
  "cifar100_n": (("noise_label",), "label"),
  "cifar10_n": (("worse_label", "aggre_label", "random_label1"), "label"),
}


class ManualDownloadError(FileNotFoundError):
  """A TFDS dataset needs files the user must download by hand."""


def load_digits(val_size: int = 497, split_seed: int = 0) -> Dataset:
  """scikit-learn's handwritten digits, 8x8x1 in [0, 1], stratified split.

  Args:
    val_size: the number of validation examples (of 1797).
    split_seed: seed of the stratified train/validation split.

  Returns:
    A :class:`Dataset` with clean training labels.
  """
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  tr_x, va_x, tr_y, va_y = model_selection.train_test_split(
    x, y, test_size=val_size, stratify=y, random_state=split_seed
  )
  return Dataset(tr_x, tr_y, tr_y.copy(), va_x, va_y, 10)


def symmetric_label_noise(dataset: Dataset, rate: float, seed: int) -> Dataset:
  """Relabels exactly ``round(rate * n_train)`` training examples.

  Each chosen example gets a label drawn uniformly from the classes other
  than its current one. On clean labels the corrupted set is exactly the
  chosen set, and ``rate=1 - 1/C`` makes the labels carry no information
  about the images. On labels that are already noisy (CIFAR-N) the noise is
  added on top; ``rate=0`` leaves them as they are.

  Args:
    dataset: the data; only its training labels change.
    rate: the fraction of training labels to relabel, in ``[0, 1]``.
    seed: seed of the choice and the new labels.

  Returns:
    The dataset with new ``train_y`` and unchanged ``train_clean_y``.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"label noise rate must lie in [0, 1]; got {rate}.")
  rng = np.random.default_rng(seed)
  y = dataset.train_y
  n, c = len(y), dataset.num_classes
  chosen = rng.permutation(n)[: int(round(rate * n))]
  noisy = y.copy()
  # An offset in [1, C-1] moves every chosen label to a different class.
  noisy[chosen] = (y[chosen] + rng.integers(1, c, size=len(chosen))) % c
  return dataset._replace(train_y=noisy.astype(np.int32))


def random_labels(dataset: Dataset, seed: int) -> Dataset:
  """Replaces every training label by a uniformly random class."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, dataset.num_classes, size=len(dataset.train_y))
  return dataset._replace(train_y=y.astype(np.int32))


def class_balanced_microbatches(
  labels: np.ndarray,
  num_classes: int,
  *,
  num_steps: int,
  num_microbatches: int,
  per_class: int,
  seed: int,
) -> np.ndarray:
  """Indices of class-balanced microbatches for every step.

  Every microbatch holds ``per_class`` examples of every class (by the labels
  given, i.e. the noisy ones: the true labels are unknown to a trainer). Each
  class is drawn in epochs: a fresh permutation of its examples is consumed
  in order, so no example repeats before its whole class has been seen.

  Args:
    labels: ``[n]`` int labels.
    num_classes: C.
    num_steps: S.
    num_microbatches: N.
    per_class: examples of every class in each microbatch.
    seed: seed of the permutations and of the order inside a microbatch.

  Returns:
    int32 ``[S, N, C * per_class]`` indices into ``labels``.
  """
  labels = np.asarray(labels)
  if per_class < 1 or num_microbatches < 1 or num_steps < 0:
    raise ValueError(
      "per_class and num_microbatches must be >= 1 and num_steps >= 0; got"
      f" {per_class}, {num_microbatches}, {num_steps}."
    )
  rng = np.random.default_rng(seed)
  need = num_steps * num_microbatches * per_class
  columns = []
  for c in range(num_classes):
    pool = np.flatnonzero(labels == c)
    if len(pool) < per_class:
      raise ValueError(
        f"Class {c} has {len(pool)} examples, fewer than per_class="
        f"{per_class}; class-balanced microbatches are impossible."
      )
    reps = -(-need // len(pool))  # ceil
    stream = np.concatenate([rng.permutation(pool) for _ in range(reps)])
    columns.append(
      stream[:need].reshape(num_steps, num_microbatches, per_class)
    )
  idx = np.concatenate(columns, axis=-1)  # [S, N, C * per_class], by class
  # Shuffle within each microbatch (order is irrelevant to the mean loss but
  # keeps the batches looking like ordinary ones).
  idx = np.take_along_axis(
    idx,
    rng.permuted(np.broadcast_to(np.arange(idx.shape[-1]), idx.shape), axis=-1),
    axis=-1,
  )
  return idx.astype(np.int32)


def load_tfds(
  name: str,
  *,
  label_key: str | None = None,
  data_dir: str | None = None,
  download: bool = True,
) -> Dataset:
  """Loads a CIFAR dataset through ``tfds.data_source`` into memory.

  Args:
    name: ``"cifar100"``, ``"cifar100_n"`` or ``"cifar10_n"``.
    label_key: the training label feature. Defaults to the first of
      ``TFDS_LABELS[name]``: ``"label"`` (clean), ``"noise_label"``, and
      ``"worse_label"`` (the noisiest CIFAR-10N labels).
    data_dir: TFDS data directory (default: TFDS's own default).
    download: whether TFDS may download and prepare the data.

  Returns:
    A :class:`Dataset` with uint8 images; the validation split is ``test``.

  Raises:
    ManualDownloadError: for CIFAR-N when the manual files are missing, with
      TFDS's own download instructions.
  """
  import tensorflow_datasets as tfds

  if name not in TFDS_LABELS:
    raise ValueError(
      f"Unknown TFDS dataset {name!r}; choose one of {sorted(TFDS_LABELS)}."
    )
  choices, clean_key = TFDS_LABELS[name]
  label_key = label_key or choices[0]
  if label_key not in choices:
    raise ValueError(
      f"{name} has no label feature {label_key!r}; choose one of {choices}."
    )
  builder_kwargs = {"file_format": "array_record"}  # data_source reads these
  builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  if download and not builder.is_prepared():
    # Before TFDS downloads CIFAR itself (160 MB) only to stop at the
    # missing manual files.
    _check_manual_files(builder)
  try:
    splits = tfds.data_source(
      name,
      split=["train", "test"],
      data_dir=data_dir,
      download=download,
      builder_kwargs=builder_kwargs,
    )
  except ModuleNotFoundError as e:
    if "tensorflow" not in str(e):
      raise
    raise ModuleNotFoundError(
      f"Preparing {name} with TFDS needs TensorFlow (only once; reading"
      ' does not): pip install -e ".[cifar]"'
    ) from e
  train, test = (_to_arrays(s, (label_key, clean_key)) for s in splits)
  num_classes = builder.info.features[clean_key].num_classes
  return Dataset(
    train["image"],
    train[label_key],
    train[clean_key],
    test["image"],
    test[clean_key],
    num_classes,
  )


def manual_dir(builder) -> str:
  """Where TFDS looks for manually downloaded files of ``builder``."""
  return os.path.join(builder.data_dir_root, "downloads", "manual")


def _check_manual_files(builder) -> None:
  """Raises ManualDownloadError naming the missing files and TFDS's steps."""
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not instructions:
    return
  cifar_info = getattr(builder, "_cifar_info", None)
  wanted = (
    []
    if cifar_info is None
    else [cifar_info.human_label_path, cifar_info.annotations_order_path]
  )
  if getattr(cifar_info, "side_info_path", None):
    wanted.append(cifar_info.side_info_path)
  folder = manual_dir(builder)
  missing = [f for f in wanted if not os.path.exists(os.path.join(folder, f))]
  if missing or not os.path.isdir(folder):
    raise ManualDownloadError(
      f"{builder.name} needs a manual download: {missing or 'files'} not"
      f" found in {folder}. TFDS's instructions:\n{instructions}\nPlace the"
      f" files in {folder} and run again."
    )


def _to_arrays(source, label_keys) -> dict[str, np.ndarray]:
  """Reads a data source into ``image`` uint8 and int32 label arrays."""
  examples = [source[i] for i in range(len(source))]
  out = {
    "image": np.stack([np.asarray(e["image"], np.uint8) for e in examples])
  }
  for key in dict.fromkeys(label_keys):
    out[key] = np.asarray([e[key] for e in examples], np.int32)
  return out
