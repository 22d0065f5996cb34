"""Validation loss on held-out images (issue 32): which images are held out, the fixed timesteps and noise they are
scored at, when, and the validation_loss.jsonl file it is written to. Framework-free: the PyTorch and JAX twins score
the same images at the same timesteps with the same noise, so the two scripts give the same value on the same weights.

What makes it comparable across runs and recipes: every held-out image is scored at K equidistant timesteps (as
MLPerf's FLUX benchmark does) instead of random ones, with noise that is a pure function of (seed, image, timestep),
on the latent distribution's mean (no VAE sample) and the first caption (no caption edits), as a plain mean squared
error in the model's prediction space: no Min-SNR, debiasing, Huber or sample weights, which differ between recipes.
"""

import dataclasses
import json
import logging
import os

import numpy as np

from sdtrain.cli import UserError, WriteFailure
from sdtrain.run_folder import flush_file, fsync_folder, write_failure
from sdtrain.seeds import derive_seed

logger = logging.getLogger(__name__)

# The second key of held-out draws: derive_seed(seed, VALIDATION_LOSS_SEED_KEY) picks the split, and
# derive_seed(seed, VALIDATION_LOSS_SEED_KEY, image, k) the noise of an image at its k-th timestep.
VALIDATION_LOSS_SEED_KEY = 4099
LOG_FILE = "validation_loss.jsonl"


def add_validation_loss_arguments(group):
    """The held-out validation loss flags, the same in both text-to-image scripts."""
    group.add_argument(
        "--validation_split",
        type=float,
        default=None,
        help="Hold out this fraction (0 < F < 1) of the training images, chosen from --seed, and report the "
        "validation loss on them (docs/evaluation.md).",
    )
    group.add_argument(
        "--validation_data_dir",
        type=str,
        default=None,
        help="A folder of held-out images, read as --train_data_dir is, for the validation loss.",
    )
    group.add_argument(
        "--validation_loss_steps",
        type=int,
        default=None,
        help="Compute the validation loss every this many optimizer updates (and at the end); default: at the end.",
    )
    group.add_argument(
        "--validation_loss_timesteps",
        type=int,
        default=8,
        help="The number K of equidistant timesteps every held-out image is scored at.",
    )


@dataclasses.dataclass(frozen=True)
class ValidationLossConfig:
    split: float | None  # --validation_split
    data_dir: str | None  # --validation_data_dir
    steps: int | None  # --validation_loss_steps; None: at the end only
    num_timesteps: int  # --validation_loss_timesteps

    @classmethod
    def from_args(cls, args):
        return cls(
            args.validation_split, args.validation_data_dir, args.validation_loss_steps, args.validation_loss_timesteps
        )

    @property
    def active(self):
        return self.split is not None or self.data_dir is not None


def validation_loss_problem(config):
    """What is wrong with the flags, in words, or None."""
    if config.split is not None and config.data_dir is not None:
        return "--validation_split and --validation_data_dir both name the held-out images: pass one"
    if config.split is not None and not 0 < config.split < 1:
        return f"--validation_split must be between 0 and 1 (a fraction of the images), got {config.split}"
    if config.data_dir is not None and not os.path.isdir(config.data_dir):
        return f"--validation_data_dir {config.data_dir}: no such folder"
    if config.steps is not None and config.steps < 1:
        return f"--validation_loss_steps must be at least 1, got {config.steps}"
    if config.num_timesteps < 1:
        return f"--validation_loss_timesteps must be at least 1, got {config.num_timesteps}"
    if config.steps is not None and not config.active:
        return "--validation_loss_steps needs held-out images: --validation_split or --validation_data_dir"
    return None


def split_rows(num_rows, fraction, seed):
    """(training rows, held-out rows), both sorted: round(fraction x num_rows) rows held out, the first of a seeded
    permutation of all rows. It depends on (num_rows, fraction, seed) only, never on the process count."""
    held = round(fraction * num_rows)
    if held < 1 or held >= num_rows:
        raise UserError(
            f"--validation_split {fraction} of {num_rows} images holds out {held}: it must leave at least one image "
            f"for training and hold out at least one"
        )
    order = np.random.default_rng(derive_seed(seed, VALIDATION_LOSS_SEED_KEY)).permutation(num_rows)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def held_out_rows(config, dataset_config, seed):
    """(training rows, held-out rows or None), datasets.Dataset: the rows dataset_config names, which --validation_split
    cuts (split_rows); --validation_data_dir reads a folder as --train_data_dir is read. Logs how many are held out."""
    from sdtrain.captions import load_image_caption_dataset  # imports datasets

    rows = load_image_caption_dataset(dataset_config, seed)
    if config.split is not None:
        train, held = split_rows(len(rows), config.split, seed)
        logger.info(
            f"Held out {len(held)} of {len(rows)} images for the validation loss (--validation_split {config.split}); "
            f"{len(train)} train"
        )
        return rows.select(train), rows.select(held)
    if config.data_dir is not None:
        folder = dataclasses.replace(dataset_config, dataset_name=None, train_data_dir=config.data_dir)
        held = load_image_caption_dataset(dataclasses.replace(folder, max_train_samples=None), seed)
        logger.info(f"Held out {len(held)} images of --validation_data_dir {config.data_dir} for the validation loss")
        return rows, held
    return rows, None


def loss_timesteps(num_timesteps, num_train_timesteps):
    """K equidistant timesteps, the midpoints of K equal slices of [0, T): t_k = floor((k + 0.5) T / K)."""
    return [int((k + 0.5) * num_train_timesteps / num_timesteps) for k in range(num_timesteps)]


def loss_noise(seed, image, k, shape):
    """The noise held-out image `image` is scored with at its k-th timestep: float32 NumPy, the same in both
    frameworks and whatever the batch or process count."""
    rng = np.random.default_rng(derive_seed(seed, VALIDATION_LOSS_SEED_KEY, image, k))
    return rng.standard_normal(shape, dtype=np.float32)


def eval_batches(group_of_image, batch_size):
    """The held-out images as batches of at most batch_size, each from one group (the images' bucket, so a batch has
    one shape), in image order within a group. Fixed by the images alone: process p computes batches p, p + P, ..."""
    batches = []
    for group in sorted(set(group_of_image)):
        images = [i for i, g in enumerate(group_of_image) if g == group]
        batches.extend(images[start : start + batch_size] for start in range(0, len(images), batch_size))
    return batches


def is_due(config, global_step, max_train_steps):
    """Whether the validation loss is computed after update global_step: every config.steps updates and at the end."""
    return config.active and (
        global_step >= max_train_steps or (config.steps is not None and global_step % config.steps == 0)
    )


def summarize(per_image):
    """(loss, per-timestep losses) from an [images, K] array: the mean over images at each timestep, and their mean."""
    per_timestep = np.asarray(per_image, np.float64).mean(axis=0)
    return float(per_timestep.mean()), [float(value) for value in per_timestep]


class ValidationLossLog:
    """validation_loss.jsonl in the output folder, one JSON line per evaluation. Opened at the step training starts
    from, it drops the lines of later steps (an interrupted run's, past its last checkpoint), so a resumed run's file
    equals an uninterrupted run's. Rewritten whole to a .partial and renamed, so a crash never leaves half a line.
    Main process only."""

    def __init__(self, output_dir, global_step):
        self.path = os.path.join(output_dir, LOG_FILE)
        self.lines = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.lines = [line for line in f.read().splitlines() if line.strip()]
            self.lines = [line for line in self.lines if json.loads(line)["step"] <= global_step]
            self.write()

    @property
    def last_step(self):
        return json.loads(self.lines[-1])["step"] if self.lines else -1

    def write(self):
        partial = self.path + ".partial"
        try:
            with open(partial, "w") as f:
                f.write("".join(line + "\n" for line in self.lines))
            flush_file(partial)
            os.replace(partial, self.path)
            fsync_folder(os.path.dirname(self.path) or ".")
        except OSError as err:
            raise WriteFailure(write_failure("validation_loss.jsonl", os.path.dirname(self.path), err)) from err

    def append(self, record):
        self.lines.append(json.dumps(record))
        self.write()


def loss_record(step, timesteps, per_image, per_image_ema=None):
    """The JSON line (and the tracker's values) of one evaluation: step, loss, timesteps, per-timestep losses, and
    loss_ema / per_timestep_ema when the EMA is scored too."""
    loss, per_timestep = summarize(per_image)
    record = {"step": step, "loss": loss, "timesteps": list(timesteps), "per_timestep": per_timestep}
    if per_image_ema is not None:
        record["loss_ema"], record["per_timestep_ema"] = summarize(per_image_ema)
    return record


def tracker_values(record):
    """The record as the tracker's scalars."""
    values = {"validation_loss": record["loss"]}
    if "loss_ema" in record:
        values["validation_loss_ema"] = record["loss_ema"]
    return values


def describe_record(record):
    text = f"step {record['step']}: validation loss {record['loss']:.6f}"
    if "loss_ema" in record:
        text += f", EMA {record['loss_ema']:.6f}"
    return text
