"""Captions of more than 75 tokens (--max_token_length; token chunks from sdtrain.long_prompts) through the Flax text
encoders: the twin of sdtrain/torch/long_prompts.py (same names, same numbers; tests_flax/test_parity.py)."""

import dataclasses
import logging
from typing import Any

from sdtrain.long_prompts import chunk_count

logger = logging.getLogger(__name__)


def encode_text_chunks(code, text_encoders, text_encoder_params, input_ids, chunk_length):
    """(encoder_hidden_states [batch, chunks * chunk_length, features], pooled embedding of the first chunk or None)
    from token ids [batch, encoders, chunks * chunk_length]: each chunk through the family's encode_text, the hidden
    states joined along the sequence, SDXL's pooled embedding from the first chunk (as kohya's sd-scripts)."""
    batch, encoders, tokens = input_ids.shape
    chunks = tokens // chunk_length
    ids = input_ids.reshape(batch, encoders, chunks, chunk_length).transpose(0, 2, 1, 3)
    hidden_states, pooled = code.encode_text(
        text_encoders, text_encoder_params, ids.reshape(-1, encoders, chunk_length)
    )
    hidden_states = hidden_states.reshape(batch, chunks * chunk_length, hidden_states.shape[-1])
    if pooled is not None:
        pooled = pooled.reshape(batch, chunks, -1)[:, 0]
    return hidden_states, pooled


OWN_FIELDS = ("code", "chunk_length", "max_token_length")  # LongPromptCode's fields, never looked up in its code


@dataclasses.dataclass(frozen=True)
class LongPromptCode:
    """A family's code (sdtrain.jax.family) whose encode_text reads chunked token ids; all else is the family's.
    Frozen and hashable like the family's code, so a jitted function may hold it as a static field."""

    code: Any
    chunk_length: int
    max_token_length: int

    def __getattr__(self, name):
        if name in OWN_FIELDS:  # not set yet (copy, pickle): no recursion through self.code
            raise AttributeError(name)
        return getattr(self.code, name)

    def encode_text(self, text_encoders, text_encoder_params, input_ids):
        return encode_text_chunks(self.code, text_encoders, text_encoder_params, input_ids, self.chunk_length)


def long_prompt_code(code, tokenizers, max_token_length):
    """The family's code, reading chunked ids when max_token_length is set (the tokenizers give the chunk length)."""
    if max_token_length is None:
        return code
    length = tokenizers[0].model_max_length
    chunks = chunk_count(tokenizers[0], max_token_length)
    logger.info(
        f"Captions of up to {max_token_length} tokens, encoded in {chunks} chunks of {length}: "
        f"{chunks * length} positions of text conditioning"
    )
    return LongPromptCode(code, length, max_token_length)
