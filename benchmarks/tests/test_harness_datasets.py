"""The harness's data: label noise, class-balanced microbatches, TFDS."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from benchmarks.harness import datasets

MANUAL_FILES = (
  "CIFAR-10_human_annotations.csv",
  "image_order_c10.npy",
  "side_info_cifar10N.csv",
  "CIFAR-100_human_annotations.csv",
  "image_order_c100.npy",
  "side_info_cifar100N.csv",
)


def place_manual_files(monkeypatch, folder):
  """As if the user had downloaded the CIFAR-N files into ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  for f in MANUAL_FILES:
    (folder / f).write_text("")
  monkeypatch.setattr(datasets, "manual_dir", lambda builder: str(folder))


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits()


def test_digits_split(digits):
  assert digits.train_x.shape == (1300, 8, 8, 1)
  assert digits.val_x.shape == (497, 8, 8, 1)
  assert digits.train_x.dtype == np.float32
  assert digits.train_x.min() >= 0.0 and digits.train_x.max() <= 1.0
  assert digits.num_classes == 10
  np.testing.assert_array_equal(digits.train_y, digits.train_clean_y)
  # Stratified: every class in both splits, in proportion.
  counts = np.bincount(digits.val_y, minlength=10)
  assert counts.min() >= 45 and counts.max() <= 55


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_symmetric_noise_corrupts_exactly_the_rate(digits, rate, seed):
  noisy = datasets.symmetric_label_noise(digits, rate, seed)
  n = len(digits.train_y)
  assert noisy.corrupted.sum() == int(round(rate * n))
  assert noisy.train_y.min() >= 0 and noisy.train_y.max() < 10
  np.testing.assert_array_equal(noisy.train_clean_y, digits.train_clean_y)
  np.testing.assert_array_equal(noisy.val_y, digits.val_y)


def test_symmetric_noise_is_uniform_over_other_classes(digits):
  noisy = datasets.symmetric_label_noise(digits, 1.0, seed=0)
  assert noisy.corrupted.all()
  # Each (true, noisy) pair of distinct classes appears about n / 90 times.
  pairs = np.zeros((10, 10), int)
  np.add.at(pairs, (noisy.train_clean_y, noisy.train_y), 1)
  assert np.all(np.diag(pairs) == 0)
  off = pairs[~np.eye(10, dtype=bool)]
  assert off.min() > 0.3 * off.mean() and off.max() < 2.0 * off.mean()


def test_bad_noise_rate(digits):
  with pytest.raises(ValueError, match="noise rate"):
    datasets.symmetric_label_noise(digits, 1.5, 0)


def test_random_labels_are_uninformative(digits):
  rand = datasets.random_labels(digits, seed=1)
  agree = np.mean(rand.train_y == digits.train_clean_y)
  assert 0.05 < agree < 0.16  # chance is 0.1
  assert set(np.unique(rand.train_y)) == set(range(10))


@settings(max_examples=20, deadline=None)
@given(
  per_class=st.integers(1, 4),
  n=st.integers(1, 4),
  steps=st.integers(1, 30),
  seed=st.integers(0, 1000),
)
def test_class_balanced_microbatches(per_class, n, steps, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, size=60)
  labels[: 5 * per_class] = np.repeat(np.arange(5), per_class)  # all present
  idx = datasets.class_balanced_microbatches(
    labels,
    5,
    num_steps=steps,
    num_microbatches=n,
    per_class=per_class,
    seed=seed,
  )
  assert idx.shape == (steps, n, 5 * per_class) and idx.dtype == np.int32
  counts = np.apply_along_axis(np.bincount, -1, labels[idx], minlength=5)
  assert np.all(counts == per_class)
  # Epochs per class: no example repeats before its class is used up.
  for c in range(5):
    pool = np.flatnonzero(labels == c)
    stream = [i for i in idx.reshape(-1) if labels[i] == c]
    # Whole microbatches only: the order inside a microbatch is shuffled.
    first = stream[: len(pool) // per_class * per_class]
    assert len(set(first)) == len(first)


def test_class_balanced_needs_enough_examples():
  with pytest.raises(ValueError, match="Class 1 has 1 examples"):
    datasets.class_balanced_microbatches(
      np.array([0, 0, 1, 2, 2]),
      3,
      num_steps=1,
      num_microbatches=2,
      per_class=2,
      seed=0,
    )


@pytest.mark.parametrize(
  "name,label_key,num_classes",
  [
    ("cifar100", None, 100),
    ("cifar100_n", None, 100),
    ("cifar10_n", "worse_label", 10),
    ("cifar10_n", "aggre_label", 10),
    ("cifar10_n", "random_label1", 10),
  ],
)
def test_tfds_loaders_with_mock_data(
  name, label_key, num_classes, monkeypatch, tmp_path
):
  place_manual_files(monkeypatch, tmp_path / "manual")
  with tfds.testing.mock_data(num_examples=40):
    data = datasets.load_tfds(name, label_key=label_key)
    raw = tfds.data_source(
      name, split="train", builder_kwargs={"file_format": "array_record"}
    )
    raw = [raw[i] for i in range(len(raw))]
  key = label_key or datasets.TFDS_LABELS[name][0][0]
  assert data.train_x.shape == (40, 32, 32, 3)
  assert data.train_x.dtype == np.uint8
  assert data.val_x.shape == (40, 32, 32, 3)
  assert data.num_classes == num_classes
  # The training labels come from the chosen feature, the clean ones from
  # "label".
  np.testing.assert_array_equal(data.train_y, [r[key] for r in raw])
  np.testing.assert_array_equal(data.train_clean_y, [r["label"] for r in raw])
  assert data.val_y.min() >= 0 and data.val_y.max() < num_classes
  if num_classes == 10:  # the loaded labels feed the class-balanced sampler
    idx = datasets.class_balanced_microbatches(
      data.train_y, 10, num_steps=3, num_microbatches=2, per_class=1, seed=0
    )
    assert data.train_x[idx].shape == (3, 2, 10, 32, 32, 3)
    counts = np.apply_along_axis(
      np.bincount, -1, data.train_y[idx], minlength=10
    )
    assert np.all(counts == 1)


def test_unknown_tfds_names():
  with pytest.raises(ValueError, match="Unknown TFDS dataset"):
    datasets.load_tfds("mnist")
  with pytest.raises(ValueError, match="no label feature 'noise_label'"):
    datasets.load_tfds("cifar10_n", label_key="noise_label")


@pytest.mark.parametrize(
  "name,filename",
  [
    ("cifar10_n", "side_info_cifar10N.csv"),
    ("cifar100_n", "CIFAR-100_human_annotations.csv"),
  ],
)
def test_manual_download_error_gives_tfds_instructions(
  tmp_path, monkeypatch, name, filename
):
  def download(*args, **kwargs):
    raise AssertionError("tried to download before checking manual files")

  monkeypatch.setattr(tfds, "data_source", download)
  with pytest.raises(datasets.ManualDownloadError) as info:
    datasets.load_tfds(name, data_dir=str(tmp_path))
  message = str(info.value)
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  assert manual in message
  assert filename in message  # from TFDS's MANUAL_DOWNLOAD_INSTRUCTIONS
  assert "github.com/UCSC-REAL/cifar-10-100n" in message


def test_other_errors_pass_through_when_manual_files_exist(
  tmp_path, monkeypatch
):
  manual = tmp_path / "downloads" / "manual"  # TFDS's default manual dir
  manual.mkdir(parents=True)
  for f in MANUAL_FILES:
    (manual / f).write_text("")

  def offline(*args, **kwargs):
    raise ConnectionError("no internet")

  monkeypatch.setattr(tfds, "data_source", offline)
  with pytest.raises(ConnectionError):
    datasets.load_tfds("cifar10_n", data_dir=str(tmp_path))


def test_symmetric_noise_keeps_human_labels(digits):
  """On already-noisy labels (CIFAR-N) noise goes on top; rate 0 keeps them."""
  human = datasets.symmetric_label_noise(digits, 0.3, seed=5)
  np.testing.assert_array_equal(
    datasets.symmetric_label_noise(human, 0.0, seed=6).train_y, human.train_y
  )
  more = datasets.symmetric_label_noise(human, 0.2, seed=6)
  assert np.sum(more.train_y != human.train_y) == int(round(0.2 * 1300))
