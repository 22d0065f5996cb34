"""Captions: the image-caption dataset (hub name, saved dataset or image folder) and the per-image caption edits
(dropout, tag shuffling)."""

import dataclasses
import os

import datasets
from PIL import Image

from sdtrain.cli import UserError


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """How a caption changes at each use, built once from the flags in main()."""

    proportion_empty_prompts: float = 0.0  # chance that a use sees the empty caption
    shuffle_caption: bool = False  # shuffle the comma-separated tags
    keep_tokens: int = 0  # tags at the start that stay in place and are never dropped
    caption_tag_dropout_rate: float = 0.0  # chance that each other tag is dropped


def edit_caption(caption, rng, config):
    """The caption as this use sees it. Tag-style captions ("1girl, red hair, smiling") get their comma-separated tags
    dropped and shuffled, the first config.keep_tokens tags kept in place; then the whole caption is replaced by the
    empty one with probability config.proportion_empty_prompts, so the model also learns the unconditional picture
    that classifier-free guidance needs. Every draw comes from this use's `rng`."""
    if config.shuffle_caption or config.caption_tag_dropout_rate > 0:
        tags = [tag.strip() for tag in caption.split(",")]
        kept, rest = tags[: config.keep_tokens], tags[config.keep_tokens :]
        if config.caption_tag_dropout_rate > 0:
            rest = [tag for tag in rest if rng.random() >= config.caption_tag_dropout_rate]
        if config.shuffle_caption:
            rest = [rest[index] for index in rng.permutation(len(rest))]
        caption = ", ".join(kept + rest)
    if config.proportion_empty_prompts > 0 and rng.random() < config.proportion_empty_prompts:
        caption = ""
    return caption


# The metadata files that make a --train_data_dir an imagefolder (datasets' names).
METADATA_FILES = {"metadata.jsonl", "metadata.csv", "metadata.parquet"}
# The caption file beside each image when there is no metadata file (kohya's and OneTrainer's default extension).
CAPTION_EXTENSION = ".txt"


def caption_file_dataset(folder, image_column, caption_column):
    """A folder of images with a caption file beside each (photo.png and photo.txt, the kohya/OneTrainer layout) as
    rows of (image, caption); None when the folder has a metadata file (then it is an imagefolder) or no caption file.
    Each non-empty line of a caption file is a caption; several lines are alternatives, one drawn per use."""
    image_extensions = {extension.lower() for extension in Image.registered_extensions()}
    images, has_caption_files = [], False
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            if name in METADATA_FILES:
                return None
            extension = os.path.splitext(name)[1]
            has_caption_files = has_caption_files or extension.lower() == CAPTION_EXTENSION
            if extension.lower() in image_extensions and not name.startswith("."):
                images.append(os.path.join(root, name))
    if not has_caption_files:
        return None
    captions, uncaptioned = [], []
    for path in images:
        caption_path = os.path.splitext(path)[0] + CAPTION_EXTENSION
        if not os.path.isfile(caption_path):
            uncaptioned.append(os.path.relpath(path, folder))
            continue
        with open(caption_path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        captions.append(lines[0] if len(lines) == 1 else lines or "")
    if uncaptioned:
        raise ValueError(
            f"--train_data_dir {folder}: {len(uncaptioned)} of {len(images)} images have no {CAPTION_EXTENSION} "
            f"caption file beside them: {', '.join(uncaptioned[:5])}{', ...' if len(uncaptioned) > 5 else ''} "
            "(write one, empty for no caption, or give the folder a metadata.jsonl)"
        )
    if any(isinstance(caption, list) for caption in captions):
        captions = [caption if isinstance(caption, list) else [caption] for caption in captions]
    dataset = datasets.Dataset.from_dict({image_column: images, caption_column: captions})
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def load_image_caption_dataset(args, seed):
    """The training rows as a datasets.Dataset, with both columns checked; images stay undecoded until used."""
    if args.dataset_name is not None:
        source = f"--dataset_name {args.dataset_name}"
        looks_local = args.dataset_name.startswith(("/", "./", "../", "~")) or os.path.exists(args.dataset_name)
        if looks_local and not os.path.exists(os.path.expanduser(args.dataset_name)):
            raise UserError(f"{source}: no such folder")
        name = os.path.expanduser(args.dataset_name) if looks_local else args.dataset_name
        try:
            dataset = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        except Exception as err:
            raise UserError(f"{source}: could not load a 'train' split ({type(err).__name__}: {err})") from err
    else:
        source = f"--train_data_dir {args.train_data_dir}"
        if not os.path.isdir(args.train_data_dir):
            raise UserError(f"{source}: no such folder")
        dataset = caption_file_dataset(args.train_data_dir, args.image_column, args.caption_column)
        if dataset is None:
            try:
                dataset = datasets.load_dataset(
                    "imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir, split="train"
                )
            except Exception as err:
                raise UserError(f"{source}: not a readable imagefolder ({type(err).__name__}: {err})") from err
    for flag, column in [("--image_column", args.image_column), ("--caption_column", args.caption_column)]:
        if column not in dataset.column_names:
            raise UserError(
                f"{flag} '{column}' is not a column of {source}; its columns are: {', '.join(dataset.column_names)}"
            )
    if len(dataset) == 0:
        raise UserError(f"{source} has no rows")
    if isinstance(dataset.features[args.image_column], datasets.Image):
        # Decode ourselves, so an unreadable file is reported by name.
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(args.max_train_samples, len(dataset))))
    return dataset
