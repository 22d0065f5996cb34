"""The held-out validation loss's framework-free parts (sdtrain.validation_loss): the split, the timesteps, the noise,
the batches, the jsonl file across a resume, and the flags' clear errors. The launched checks are in
test_train_text_to_image.py (resume) and test_multi_node.py (two processes); the PyTorch-JAX parity in
tests_flax/test_parity.py."""

import json
import os

import numpy as np
import pytest

import train_text_to_image
from devkit import tiny_sd
from sdtrain.captions import load_image_caption_dataset
from sdtrain.cli import UserError
from sdtrain.data_config import DatasetConfig
from sdtrain.validation_loss import (
    LOG_FILE,
    ValidationLossConfig,
    ValidationLossLog,
    eval_batches,
    held_out_rows,
    is_due,
    loss_noise,
    loss_record,
    loss_timesteps,
    split_rows,
)


def test_the_split_depends_on_the_seed_only_and_leaves_no_image_in_both():
    train, held = split_rows(100, 0.1, seed=7)
    assert len(held) == 10 and len(train) == 90 and sorted(train + held) == list(range(100))
    assert split_rows(100, 0.1, seed=7) == (train, held)  # the same on every process and after a resume
    assert split_rows(100, 0.1, seed=8)[1] != held
    assert split_rows(10, 0.1, seed=7)[1] != [0]  # a draw, not the first images


@pytest.mark.parametrize(
    "num_rows, fraction, held", [(10, 0.01, 0), (3, 0.9, 3), (1, 0.5, 0)], ids=["none-held", "none-left", "one-image"]
)
def test_a_split_that_leaves_no_training_or_no_held_out_image_names_the_numbers(num_rows, fraction, held):
    with pytest.raises(UserError, match=rf"--validation_split {fraction} of {num_rows} images holds out {held}:"):
        split_rows(num_rows, fraction, seed=0)


def test_timesteps_are_the_midpoints_of_equal_slices():
    assert loss_timesteps(8, 1000) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert loss_timesteps(1, 1000) == [500]
    assert loss_timesteps(4, 10) == [1, 3, 6, 8]


def test_noise_is_a_function_of_seed_image_and_timestep():
    noise = loss_noise(7, 3, 2, (4, 8, 8))
    assert noise.dtype == np.float32 and noise.shape == (4, 8, 8)
    assert np.array_equal(noise, loss_noise(7, 3, 2, (4, 8, 8)))
    for other in [(8, 3, 2), (7, 4, 2), (7, 3, 1)]:
        assert not np.array_equal(noise, loss_noise(*other, (4, 8, 8)))


def test_batches_are_cut_per_bucket_whatever_the_process_count():
    assert eval_batches([0, 1, 0, 0, 1], 2) == [[0, 2], [3], [1, 4]]
    assert eval_batches([0] * 5, 4) == [[0, 1, 2, 3], [4]]


def test_due_every_n_updates_and_at_the_end():
    config = ValidationLossConfig(0.1, None, 3, 8)
    assert [step for step in range(1, 8) if is_due(config, step, 7)] == [3, 6, 7]
    at_end = ValidationLossConfig(0.1, None, None, 8)
    assert [step for step in range(1, 8) if is_due(at_end, step, 7)] == [7]
    assert not is_due(ValidationLossConfig(None, None, None, 8), 7, 7)


def test_the_file_drops_the_lines_past_the_resumed_step(tmp_path):
    per_image = np.array([[1.0, 2.0], [3.0, 4.0]])
    log = ValidationLossLog(str(tmp_path), 0)
    for step in [2, 4, 6]:
        log.append(loss_record(step, [250, 750], per_image * step, per_image))
    with open(tmp_path / LOG_FILE) as f:
        first = json.loads(f.readline())
    assert first == {
        "step": 2,
        "loss": 5.0,
        "timesteps": [250, 750],
        "per_timestep": [4.0, 6.0],
        "loss_ema": 2.5,
        "per_timestep_ema": [2.0, 3.0],
    }
    resumed = ValidationLossLog(str(tmp_path), 4)
    assert resumed.last_step == 4 and [json.loads(line)["step"] for line in resumed.lines] == [2, 4]
    with open(tmp_path / LOG_FILE) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]
    assert sorted(os.listdir(tmp_path)) == [LOG_FILE]  # no .partial left behind


def parse(*flags):
    return train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--validation_split", "1"], "--validation_split must be between 0 and 1 (a fraction of the images), got 1.0"),
        (["--validation_split", "0"], "--validation_split must be between 0 and 1"),
        (["--validation_split", "0.1", "--validation_data_dir", "."], "--validation_split and --validation_data_dir"),
        (["--validation_data_dir", "/no/such/folder"], "--validation_data_dir /no/such/folder: no such folder"),
        (["--validation_split", "0.1", "--validation_loss_steps", "0"], "--validation_loss_steps must be at least 1"),
        (["--validation_split", "0.1", "--validation_loss_timesteps", "0"], "--validation_loss_timesteps must be at"),
        (["--validation_loss_steps", "5"], "--validation_loss_steps needs held-out images"),
    ],
)
def test_bad_validation_loss_flags_are_refused_by_name(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse(*flags)
    assert message in capsys.readouterr().err


def test_held_out_rows_from_a_split_or_a_folder(tmp_path):
    """--validation_split takes its rows out of the training rows; --validation_data_dir reads its own folder as
    --train_data_dir is read, and every training row trains."""
    train_dir = tiny_sd.write_imagefolder(str(tmp_path / "train"), num_images=10, size=16)
    held_dir = tiny_sd.write_imagefolder(str(tmp_path / "held"), num_images=3, size=16)
    dataset_config = DatasetConfig(None, None, train_dir, "image", "text", 10, None, False)
    rows = list(load_image_caption_dataset(dataset_config, seed=7)["text"])
    train, held = held_out_rows(ValidationLossConfig(0.2, None, None, 8), dataset_config, seed=7)
    assert (len(train), len(held)) == (8, 2)
    assert sorted(list(train["text"]) + list(held["text"])) == sorted(rows)
    train, held = held_out_rows(ValidationLossConfig(None, held_dir, None, 8), dataset_config, seed=7)
    assert (len(train), len(held)) == (10, 3)
    train, held = held_out_rows(ValidationLossConfig(None, None, None, 8), dataset_config, seed=7)
    assert len(train) == 10 and held is None
