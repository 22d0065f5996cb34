"""Textual inversion's token side: example images, prompt templates, the placeholder tokens and the files the
learned embedding is saved as (diffusers' and the UIs')."""

import math
import os
import re

import numpy as np

from sdtrain.cli import UserError
from sdtrain.images import inspect_images, load_rgb
from sdtrain.masks import is_masklabel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# Prompts the placeholder is trained in; {} is replaced by the placeholder (all of its vectors). # EDIT: to taste.
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a picture of a {}",
    "a close-up photo of a {}",
    "a photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a cropped photo of a {}",
    "a rendering of a {}",
    "a good photo of the {}",
    "a photo of my {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a photo of one {}",
    "an image of the {}",
    "a snapshot of a {}",
    "a detailed photo of the {}",
]


STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a picture in the style of {}",
    "a rendering in the style of {}",
    "an artwork in the style of {}",
    "a drawing in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "an illustration in the style of {}",
    "a sketch in the style of {}",
]


def add_token_arguments(group):
    """The placeholder token, what its vectors start from, and the prompts it is trained in (OBJECT_TEMPLATES or
    STYLE_TEMPLATES)."""
    group.add_argument(
        "--placeholder_token",
        type=str,
        required=True,
        help="The new token that stands for the concept in prompts, e.g. '<cat-toy>'.",
    )
    group.add_argument(
        "--initializer_token",
        type=str,
        required=True,
        help="An existing single-token word whose embedding starts every new vector, e.g. 'toy'.",
    )
    group.add_argument(
        "--num_vectors",
        type=int,
        default=1,
        help="Embedding vectors the placeholder expands to (more capture more detail).",
    )
    group.add_argument(
        "--learnable_property",
        type=str,
        default="object",
        choices=["object", "style"],
        help="Train prompts that describe an object or a style.",
    )


def find_example_images(train_data_dir):
    """The example images, sorted by name, each decoded now: a bad file fails before anything is written."""
    if not os.path.isdir(train_data_dir):
        raise UserError(f"--train_data_dir {train_data_dir}: no such folder")
    names = os.listdir(train_data_dir)
    # A <name>-masklabel.png is the mask of an example (sdtrain.masks, --masked_loss), not an example of its own.
    names = sorted(name for name in names if name.lower().endswith(IMAGE_EXTENSIONS) and not is_masklabel(name))
    paths = [os.path.join(train_data_dir, name) for name in names]
    if not paths:
        raise UserError(f"--train_data_dir {train_data_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    _, problems = inspect_images(lambda index: load_rgb(paths[index], paths[index]).size, range(len(paths)))
    if problems:
        raise UserError(
            f"{len(problems)} of {len(paths)} images cannot be read; fix or remove them:\n  " + "\n  ".join(problems)
        )
    return paths


def add_placeholder_tokens(tokenizer, placeholder_token, num_vectors):
    """Add the placeholder (and placeholder_1 ... for several vectors) as new tokens; refuse any that the tokenizer
    already knows, as an added token or as a word or sub-word of its vocabulary ('a' would hijack every 'a')."""
    names = [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
    vocab = tokenizer.get_vocab()
    for name in names:
        for form in (name.lower() + "</w>", name, name.lower()):
            if form in vocab:
                raise UserError(
                    f"--placeholder_token {placeholder_token}: '{name}' already exists in the tokenizer (as '{form}'), "
                    "so training it would change the meaning of existing prompts; "
                    "choose a new string such as '<my-concept>'"
                )
    tokenizer.add_tokens(names)
    return names, tokenizer.convert_tokens_to_ids(names)


def initializer_token_id(tokenizer, initializer_token):
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(
            f"--initializer_token {initializer_token!r} must be exactly one token, but the tokenizer splits it into "
            f"{len(ids)}: {tokenizer.convert_ids_to_tokens(ids)}; pick a single word such as 'toy' or 'painting'"
        )
    return ids[0]


# A1111/Forge and ComfyUI read this key too; InvokeAI's probe reads the vector width from it (from a file keyed by the
# token it reads the number of vectors instead, and refuses the file).
UI_EMBEDDING_KEY = "emb_params"


# The UIs' SDXL embedding: one tensor per text encoder, named after the encoder (CLIP ViT-L, OpenCLIP bigG).
UI_SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def ui_embedding_name(placeholder_token):
    """The name the UIs show and prompts use for the embedding, which they take from its file name: the placeholder
    without the characters file systems or prompt syntax reserve, "<cat-toy>" -> "cat-toy"."""
    return re.sub(r"[^\w.-]+", "", placeholder_token).strip(".") or "embedding"


def learned_embeds_name(encoder_index):
    """diffusers' name for the rows of text encoder `encoder_index`: learned_embeds, then learned_embeds_2 (SDXL)."""
    return "learned_embeds" + (f"_{encoder_index + 1}" if encoder_index else "")


def add_embedding_format_argument(group):
    group.add_argument(
        "--embedding_format",
        type=str,
        default="both",
        choices=["diffusers", "ui", "both"],
        help="Final files: learned_embeds(_2) (diffusers), <placeholder> (A1111/Forge, ComfyUI, InvokeAI), or both.",
    )


def embedding_files(output_dir, placeholder_token, embedding_format, suffix, num_encoders=1):
    """(path, {key in the file: text encoder index}) of each final embeddings file in output_dir that
    --embedding_format asks for:
    diffusers' learned_embeds.<suffix> (and learned_embeds_2.<suffix> for SDXL's second encoder) keyed by the
    placeholder, and the UIs' <name>.<suffix>, keyed by UI_EMBEDDING_KEY or for SDXL by UI_SDXL_EMBEDDING_KEYS."""
    files = []
    if embedding_format in ("diffusers", "both"):
        for index in range(num_encoders):
            path = os.path.join(output_dir, f"{learned_embeds_name(index)}.{suffix}")
            files.append((path, {placeholder_token: index}))
    if embedding_format in ("ui", "both"):
        keys = (UI_EMBEDDING_KEY,) if num_encoders == 1 else UI_SDXL_EMBEDDING_KEYS
        path = os.path.join(output_dir, f"{ui_embedding_name(placeholder_token)}.{suffix}")
        files.append((path, {key: index for index, key in enumerate(keys)}))
    return files


# A learned row longer than this many times the longest row of the text encoder's own vocabulary has diverged. CLIP's
# token rows have similar lengths (SD 1.5: at most about 0.6), and embeddings that work, even over-trained ones, stay
# within about ten times that; an exploding learning rate gives rows of 1e6 and more that are still finite, which the
# finiteness check lets through and --resume_from_checkpoint latest would pick. 100 is far from both.
DIVERGED_NORM_FACTOR = 100


def check_embedding_scale(learned_rows, vocabulary_norms, global_step):
    """Before anything is written: every learned row (one [num_vectors, hidden] array per text encoder) is at most
    DIVERGED_NORM_FACTOR times as long as the longest row of that encoder's vocabulary (vocabulary_norms). Otherwise
    stop, naming the step and the norm, as check_finite does for non-finite values."""
    for index, (rows, vocabulary_norm) in enumerate(zip(learned_rows, vocabulary_norms, strict=True)):
        norm = float(np.max(np.linalg.norm(np.asarray(rows, dtype=np.float64), axis=-1)))
        if math.isfinite(norm) and norm > DIVERGED_NORM_FACTOR * vocabulary_norm:  # inf and NaN: check_finite's
            encoder = f" of text encoder {index + 1}" if len(learned_rows) > 1 else ""
            raise FloatingPointError(
                f"the embedding diverged at step {global_step}: a learned row{encoder} has norm {norm:.3g}, over "
                f"{DIVERGED_NORM_FACTOR} times the longest row of the vocabulary ({vocabulary_norm:.3g}): stopping, "
                "nothing was written for this step. Lower --learning_rate, or clip gradients with --max_grad_norm"
            )
