"""The data flags of the text-to-image scripts (where the rows come from, how a caption changes at each use) and the
frozen configs built once from them. Apart from captions.py, which reads them, because that imports `datasets`: the
scripts define their flags before anything heavy loads, so --help answers at once."""

import dataclasses

import numpy as np

from sdtrain.cli import UserError


def add_dataset_arguments(group):
    """Where the image-caption rows come from, the same flags in both text-to-image scripts."""
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id or local dataset folder that datasets.load_dataset reads.",
    )
    group.add_argument(
        "--dataset_config_name", type=str, default=None, help="Config name of the dataset, if it has several."
    )
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Local image folder: a metadata.jsonl of file_name and caption, or a caption .txt beside each image.",
    )
    group.add_argument("--image_column", type=str, default="image", help="Dataset column holding the images.")
    group.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="Dataset column holding a caption or a list of captions (one is drawn per use).",
    )
    group.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on a random subset of this many examples (for debugging).",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")


def add_cache_arguments(group):
    """What the text-to-image scripts encode once before training instead of at every step."""
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image once (both flips with --random_flip); train from the cache. Needs --center_crop.",
    )
    group.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="Encode every distinct caption once before training and train from the stored text-encoder outputs.",
    )


def add_caption_arguments(group):
    """The caption edits at each use (CaptionConfig) and what to do with an unreadable caption file."""
    group.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Replace each use of a caption by the empty caption with this probability (classifier-free guidance).",
    )
    group.add_argument(
        "--shuffle_caption", action="store_true", help="Shuffle the comma-separated tags of a caption at every use."
    )
    group.add_argument(
        "--keep_tokens",
        type=int,
        default=0,
        help="Tags at the start of a caption that stay in place (and are never dropped).",
    )
    group.add_argument(
        "--caption_tag_dropout_rate",
        type=float,
        default=0.0,
        help="Drop each tag of a caption (after --keep_tokens) with this probability at every use.",
    )
    group.add_argument(
        "--skip_bad_captions",
        action="store_true",
        help="Leave out (and count) the images whose caption .txt file is not UTF-8, instead of stopping.",
    )


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Where the training rows come from (add_dataset_arguments), built once from the flags in main()."""

    dataset_name: str | None
    dataset_config_name: str | None
    train_data_dir: str | None
    image_column: str
    caption_column: str
    max_train_samples: int | None
    cache_dir: str | None
    skip_bad_captions: bool  # leave out images whose caption file is not UTF-8, instead of stopping

    @classmethod
    def from_args(cls, args):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """How a caption changes at each use, built once from the flags in main()."""

    proportion_empty_prompts: float = 0.0  # chance that a use sees the empty caption
    shuffle_caption: bool = False  # shuffle the comma-separated tags
    keep_tokens: int = 0  # tags at the start that stay in place and are never dropped
    caption_tag_dropout_rate: float = 0.0  # chance that each other tag is dropped

    @classmethod
    def from_args(cls, args):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def caption_problem(config):
    """Why a CaptionConfig's values cannot train (a message naming the flag), or None."""
    for name in ["proportion_empty_prompts", "caption_tag_dropout_rate"]:
        if not 0 <= getattr(config, name) < 1:
            return f"--{name} must be in [0, 1), got {getattr(config, name)}"
    if config.keep_tokens < 0:
        return f"--keep_tokens must be 0 or more, got {config.keep_tokens}"
    return None


def caption_choices(value, row, caption_column):
    """A row's captions (a caption, or a list of alternatives) as a list; anything else is refused, naming the row.
    The same in both text-to-image twins' datasets."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(
        f"--caption_column '{caption_column}', row {row}: expected a string or a list of strings, got {value!r}"
    )
