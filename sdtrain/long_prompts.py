"""Captions longer than the text encoder's window (--max_token_length, kohya's flag): the token arithmetic, framework
free. CLIP reads 77 positions, a start token, 75 tokens of text and an end token. A longer caption is cut into
75-token chunks, each wrapped in its own start and end tokens and padded to 77 with the tokenizer's pad token, as
AUTOMATIC1111 and kohya's sd-scripts do; sdtrain/torch/long_prompts.py and sdtrain/jax/long_prompts.py encode the
chunks one by one and join the hidden states along the sequence. Every caption gets the full number of chunks (a
short one is followed by chunks of padding: a start, an end and pads, which is what the empty caption tokenizes to),
so a batch has one shape and a jitted step compiles once."""

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

MAX_TOKEN_LENGTHS = (75, 150, 225)


def add_long_prompt_arguments(group):
    group.add_argument(
        "--max_token_length",
        type=int,
        choices=MAX_TOKEN_LENGTHS,
        default=None,
        help="Encode captions of up to this many tokens in 75-token chunks, each with its own start and end tokens, "
        "and join the text encoder's outputs (kohya's flag; 150 -> 154 positions, 225 -> 231). Default: the text "
        "encoder's 77-token window; longer captions are cut, and the log says how many.",
    )


def content_window(tokenizer):
    """Tokens of text in one chunk: the tokenizer's length less the start and end tokens (75 for CLIP)."""
    return tokenizer.model_max_length - 2


def chunk_count(tokenizer, max_token_length):
    """How many chunks a caption of up to max_token_length tokens is encoded in."""
    return math.ceil(max_token_length / content_window(tokenizer))


def chunk_ids(ids, chunks, chunk_length, bos, eos, pad):
    """Text token ids (no start or end token) as `chunks` chunks of chunk_length ids, one flat list: each chunk is the
    start token, up to chunk_length - 2 ids, the end token and pads; the ids that do not fit are dropped. A chunk
    without text is start, end, pads."""
    window = chunk_length - 2
    flat = []
    for chunk in range(chunks):
        text = list(ids[chunk * window : (chunk + 1) * window])
        flat += [bos, *text, eos] + [pad] * (window - len(text))
    return flat


def caption_token_ids(tokenizers, captions, max_token_length, dtype=np.int32):
    """The captions' token ids [caption, tokenizer, token], each tokenizer's own start, end and pad tokens (SD 2 and
    SDXL's second tokenizer pad with '!', SD 1 with the end token). max_token_length None: the usual window, cut to
    the tokenizer's length; else chunk_count chunks of model_max_length ids each."""
    rows = []
    for tokenizer in tokenizers:
        length = tokenizer.model_max_length
        if max_token_length is None:
            rows.append(tokenizer(captions, max_length=length, padding="max_length", truncation=True).input_ids)
            continue
        chunks = chunk_count(tokenizer, max_token_length)
        special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        text_ids = tokenizer(captions, truncation=False, add_special_tokens=False, verbose=False).input_ids
        rows.append([chunk_ids(ids[:max_token_length], chunks, length, *special) for ids in text_ids])
    return np.asarray(rows, dtype).transpose(1, 0, 2)


def log_cut_captions(tokenizer, choices, max_token_length, shown_chars=120):
    """Logs and returns a warning saying how many captions (`choices`: each row's list of captions) are longer than
    what is encoded (the 75-token window, or max_token_length), showing the longest; None when none is cut. Called
    once, where the dataset is built: a cut caption should not go unnoticed."""
    captions = [caption for row in choices for caption in row]
    if not captions:
        return None
    limit = max_token_length or content_window(tokenizer)
    lengths = [
        len(ids) for ids in tokenizer(captions, truncation=False, add_special_tokens=False, verbose=False).input_ids
    ]
    cut = sum(length > limit for length in lengths)
    if not cut:
        return None
    longest = int(np.argmax(lengths))
    text = captions[longest] if len(captions[longest]) <= shown_chars else captions[longest][:shown_chars] + "..."
    advice = "" if limit >= MAX_TOKEN_LENGTHS[-1] else f"; --max_token_length {MAX_TOKEN_LENGTHS[-1]} encodes more"
    note = (
        f"{cut} of {len(captions)} captions are longer than {limit} tokens and are cut to it (the longest has "
        f"{lengths[longest]} tokens: {text!r}){advice}"
    )
    logger.warning(note)
    return note
