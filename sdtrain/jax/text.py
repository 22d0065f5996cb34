"""Captions to token ids, as the family's encode_text reads them."""

import numpy as np


def token_ids(tokenizers, captions):
    """The captions' token ids [caption, tokenizer, token] as int32, padded to each tokenizer's full length."""
    ids = [
        tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True).input_ids
        for tokenizer in tokenizers
    ]
    return np.asarray(ids, np.int32).transpose(1, 0, 2)
