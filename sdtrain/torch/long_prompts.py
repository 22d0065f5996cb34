"""Captions of more than 75 tokens (--max_token_length; token chunks from sdtrain.long_prompts) through the PyTorch
text encoders: each 77-token chunk is encoded on its own by the family's encode_text, so each keeps what the family
reads (SDXL: both encoders' penultimate layers side by side), and the chunks' hidden states are joined along the
sequence, which the UNet's cross-attention takes at any length. The JAX twin is sdtrain/jax/long_prompts.py."""

import dataclasses
import logging

import numpy as np
import torch

from sdtrain.long_prompts import caption_token_ids, chunk_count

logger = logging.getLogger(__name__)


def encode_text_chunks(code, text_encoders, input_ids, chunk_length):
    """(encoder_hidden_states [batch, chunks * chunk_length, features], pooled embedding of the first chunk or None)
    from token ids [batch, encoders, chunks * chunk_length]. SDXL's pooled embedding comes from the first chunk, as in
    kohya's sd-scripts: the one that holds the caption's start."""
    batch, encoders, tokens = input_ids.shape
    chunks = tokens // chunk_length
    # [batch, encoders, chunks, length] -> [batch * chunks, encoders, length]: every chunk a caption of its own.
    ids = input_ids.reshape(batch, encoders, chunks, chunk_length).transpose(1, 2).reshape(-1, encoders, chunk_length)
    hidden_states, pooled = code.encode_text(text_encoders, ids)
    hidden_states = hidden_states.reshape(batch, chunks * chunk_length, hidden_states.shape[-1])
    if pooled is not None:
        pooled = pooled.reshape(batch, chunks, -1)[:, 0]
    return hidden_states, pooled


@dataclasses.dataclass(frozen=True)
class LongPromptCode:
    """A family's code (sdtrain.torch.family) whose encode_text reads chunked token ids; all else is the family's."""

    code: object
    chunk_length: int
    max_token_length: int

    def __getattr__(self, name):
        if name in (
            "code",
            "chunk_length",
            "max_token_length",
        ):  # not set yet (copy, pickle): no recursion through self.code
            raise AttributeError(name)
        return getattr(self.code, name)

    def encode_text(self, text_encoders, input_ids):
        return encode_text_chunks(self.code, text_encoders, input_ids, self.chunk_length)


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


def token_ids(tokenizers, captions, max_token_length):
    """The captions' ids as a LongTensor [caption, tokenizer, token] (see sdtrain.long_prompts.caption_token_ids)."""
    return torch.from_numpy(caption_token_ids(tokenizers, captions, max_token_length, np.int64))


class LongPromptPipeline:
    """A diffusers pipeline (for the validation images) that encodes its prompt as the training captions are, in
    chunks, and passes the embeddings: the pipelines' own encode_prompt would cut it to 77 tokens. The negative prompt
    is the empty caption chunked alike (the shapes must match for classifier-free guidance), or zeros where the
    pipeline samples its unconditional branch from zeros (SDXL's force_zeros_for_empty_prompt). Everything else,
    attributes set included, is the pipeline's."""

    def __init__(self, pipeline, code):
        self.__dict__.update(pipeline=pipeline, code=code)

    def __getattr__(self, name):
        if name in ("pipeline", "code"):  # not set yet (copy, pickle): no recursion through self.pipeline
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def __setattr__(self, name, value):
        setattr(self.pipeline, name, value)

    def __call__(self, prompt, **kwargs):
        family, pipeline = self.code.family, self.pipeline
        tokenizers = [getattr(pipeline, name) for name in family.tokenizers]
        encoders = [getattr(pipeline, name) for name in family.text_encoders]
        input_ids = token_ids(tokenizers, [prompt, ""], self.code.max_token_length).to(pipeline.device)
        with torch.no_grad():
            hidden_states, pooled = self.code.encode_text(encoders, input_ids)
        embeds = {"prompt_embeds": hidden_states[:1]}
        negative = {"negative_prompt_embeds": hidden_states[1:]}
        if pooled is not None:
            embeds["pooled_prompt_embeds"], negative["negative_pooled_prompt_embeds"] = pooled[:1], pooled[1:]
        if not pipeline.config.get("force_zeros_for_empty_prompt", False):
            embeds.update(negative)
        return pipeline(**embeds, **kwargs)


def long_prompt_pipeline(pipeline, code):
    """The pipeline, rendering prompts in chunks where the code reads chunked ids (long_prompt_code)."""
    return LongPromptPipeline(pipeline, code) if isinstance(code, LongPromptCode) else pipeline
