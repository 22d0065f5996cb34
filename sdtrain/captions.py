"""Captions: the image-caption dataset (hub name, saved dataset or image folder) and the per-image caption edits
(dropout, tag shuffling)."""

import codecs
import logging
import os

import datasets
from PIL import Image

from sdtrain.cli import UserError
from sdtrain.masks import is_masklabel

logger = logging.getLogger(__name__)


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


def read_caption_file(path):
    """The captions of one caption file: its non-empty lines, stripped. UTF-8, with a leading byte-order mark (which
    Windows Notepad writes) dropped rather than read as part of the first caption. Raises UnicodeDecodeError."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def not_utf8_message(path, err):
    """Where and how a caption file is not UTF-8 (err: its UnicodeDecodeError), and what to do."""
    with open(path, "rb") as f:
        bom = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
    return (
        f"caption file {path} is not UTF-8: byte offset {err.start + bom} is 0x{err.object[err.start]:02x} "
        "(a Latin-1 or Windows-1252 file, or not a text file): re-save it as UTF-8, "
        "or pass --skip_bad_captions to leave its image out"
    )


def caption_file_dataset(folder, image_column, caption_column, skip_bad_captions=False):
    """A folder of images with a caption file beside each (photo.png and photo.txt, the kohya/OneTrainer layout) as
    rows of (image, caption); None when the folder has a metadata file (then it is an imagefolder) or no caption file.
    Each non-empty line of a caption file is a caption; several lines are alternatives, one drawn per use. A caption
    file that is not UTF-8 is refused by name, or with skip_bad_captions its image is left out (and counted)."""
    image_extensions = {extension.lower() for extension in Image.registered_extensions()}
    images, has_caption_files = [], False
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            if name in METADATA_FILES:
                return None
            extension = os.path.splitext(name)[1]
            has_caption_files = has_caption_files or extension.lower() == CAPTION_EXTENSION
            # A <name>-masklabel.png is the mask of an image (sdtrain.masks), not an image to train on.
            if extension.lower() in image_extensions and not name.startswith(".") and not is_masklabel(name):
                images.append(os.path.join(root, name))
    if not has_caption_files:
        return None
    kept, captions, uncaptioned, skipped = [], [], [], []
    for path in images:
        caption_path = os.path.splitext(path)[0] + CAPTION_EXTENSION
        if not os.path.isfile(caption_path):
            uncaptioned.append(os.path.relpath(path, folder))
            continue
        try:
            lines = read_caption_file(caption_path)
        except UnicodeDecodeError as err:
            if not skip_bad_captions:
                raise UserError(not_utf8_message(caption_path, err)) from None
            skipped.append(os.path.relpath(caption_path, folder))
            continue
        kept.append(path)
        captions.append(lines[0] if len(lines) == 1 else lines or "")
    if uncaptioned:
        raise UserError(
            f"--train_data_dir {folder}: {len(uncaptioned)} of {len(images)} images have no {CAPTION_EXTENSION} "
            f"caption file beside them: {', '.join(uncaptioned[:5])}{', ...' if len(uncaptioned) > 5 else ''} "
            "(write one, empty for no caption, or give the folder a metadata.jsonl)"
        )
    if skipped:
        logger.warning(
            f"--skip_bad_captions: left out {len(skipped)} of {len(images)} images, their caption files are not "
            f"UTF-8: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}"
        )
    if not images:
        raise UserError(
            f"--train_data_dir {folder} has {CAPTION_EXTENSION} caption files but no image that Pillow reads "
            f"(its extensions: {', '.join(sorted(image_extensions)[:8])}, ...)"
        )
    if not kept:
        raise UserError(f"--train_data_dir {folder}: every caption file is not UTF-8 (--skip_bad_captions left none)")
    if any(isinstance(caption, list) for caption in captions):
        captions = [caption if isinstance(caption, list) else [caption] for caption in captions]
    dataset = datasets.Dataset.from_dict({image_column: kept, caption_column: captions})
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def check_metadata_encoding(folder):
    """A metadata.jsonl or .csv that is not UTF-8 is refused by name and byte offset (datasets' own error names
    neither); there is no image to leave out, so --skip_bad_captions does not apply."""
    for name in sorted(METADATA_FILES - {"metadata.parquet"}):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"metadata file {path} is not UTF-8: byte offset {err.start} is 0x{data[err.start]:02x} "
                "(a Latin-1 or Windows-1252 file?): re-save it as UTF-8"
            ) from None


def describe_captions(values, origin):
    """One line for the log: how many captions came from where, how many are empty, how many have alternatives."""
    # A row is a caption or a list of alternatives ([""] when its caption file is empty and others have several).
    # (A bad row, not a string or list, is refused by name later, by the dataset class: here it counts as empty.)
    rows = [[value] if isinstance(value, str) else value if isinstance(value, list) else [] for value in values]
    rows = [[part for part in row if isinstance(part, str)] for row in rows]
    alternatives = [len(row) for row in rows if len(row) > 1]
    empty = sum(1 for row in rows if not any(part.strip() for part in row))
    line = f"captions: {len(rows)} from {origin}, {empty} empty, {len(alternatives)} with alternatives"
    if alternatives:
        low, high = min(alternatives), max(alternatives)
        line += f" ({low} each)" if low == high else f" ({low}-{high} each)"
    return line


def load_image_caption_dataset(config, seed):
    """The training rows a DatasetConfig names, as a datasets.Dataset with both columns checked; images stay undecoded
    until used. `seed` picks the --max_train_samples subset."""
    if config.dataset_name is not None:
        source = f"--dataset_name {config.dataset_name}"
        looks_local = config.dataset_name.startswith(("/", "./", "../", "~")) or os.path.exists(config.dataset_name)
        if looks_local and not os.path.exists(os.path.expanduser(config.dataset_name)):
            raise UserError(f"{source}: no such folder")
        name = os.path.expanduser(config.dataset_name) if looks_local else config.dataset_name
        try:
            dataset = datasets.load_dataset(name, config.dataset_config_name, cache_dir=config.cache_dir, split="train")
        except Exception as err:
            raise UserError(f"{source}: could not load a 'train' split ({type(err).__name__}: {err})") from err
        origin = f"dataset column '{config.caption_column}'"
    else:
        source = f"--train_data_dir {config.train_data_dir}"
        if not os.path.isdir(config.train_data_dir):
            raise UserError(f"{source}: no such folder")
        dataset = caption_file_dataset(
            config.train_data_dir, config.image_column, config.caption_column, config.skip_bad_captions
        )
        origin = f"{CAPTION_EXTENSION} files"
        if dataset is None:
            origin = "the metadata file"
            check_metadata_encoding(config.train_data_dir)
            try:
                dataset = datasets.load_dataset(
                    "imagefolder", data_dir=config.train_data_dir, cache_dir=config.cache_dir, split="train"
                )
            except Exception as err:
                raise UserError(f"{source}: not a readable imagefolder ({type(err).__name__}: {err})") from err
    for flag, column in [("--image_column", config.image_column), ("--caption_column", config.caption_column)]:
        if column not in dataset.column_names:
            raise UserError(
                f"{flag} '{column}' is not a column of {source}; its columns are: {', '.join(dataset.column_names)}"
            )
    if len(dataset) == 0:
        raise UserError(f"{source} has no rows")
    if isinstance(dataset.features[config.image_column], datasets.Image):
        # Decode ourselves, so an unreadable file is reported by name.
        dataset = dataset.cast_column(config.image_column, datasets.Image(decode=False))
    if config.max_train_samples is not None and config.max_train_samples > len(dataset):
        logger.warning(
            f"--max_train_samples {config.max_train_samples}: {source} has {len(dataset)} rows, training on all"
        )
    if config.max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(config.max_train_samples, len(dataset))))
    logger.info(describe_captions(dataset[config.caption_column], origin))
    return dataset
