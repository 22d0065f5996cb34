"""The JAX side of each model family (sdtrain.families.Family): which tokenizers and Flax text encoders load, how
token ids become the UNet's text conditioning, and its added conditioning. The scripts ask `family_code(family)` and
never test for SD or SDXL themselves; sdtrain/torch/family.py has the same method names. A new family is one more
class here, registered in FAMILY_CODE under its Family's name."""

import dataclasses

import jax.numpy as jnp
from diffusers import FlaxStableDiffusionPipeline, FlaxStableDiffusionXLPipeline
from transformers import CLIPTokenizerFast

from sdtrain.cli import UserError
from sdtrain.families import Family
from sdtrain.jax.models import load_flax_text_encoder


@dataclasses.dataclass(frozen=True)
class SDCode:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, whose last hidden state conditions the UNet. Frozen and
    hashable, so a jitted function may hold it as a static field."""

    family: Family

    pipeline_class = FlaxStableDiffusionPipeline

    def load_tokenizers(self, folder, tokenizer_name=None, cache_dir=None):
        """One tokenizer per text encoder; tokenizer_name (--tokenizer_name) replaces the first."""
        tokenizers = []
        for name in self.family.tokenizers:
            if tokenizer_name and not tokenizers:
                try:
                    tokenizers.append(CLIPTokenizerFast.from_pretrained(tokenizer_name, cache_dir=cache_dir))
                except (OSError, ValueError) as err:
                    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise UserError(
                        f"--tokenizer_name {tokenizer_name}: cannot load a tokenizer ({first_line})"
                    ) from err
            else:
                tokenizers.append(CLIPTokenizerFast.from_pretrained(folder, subfolder=name))
        return tokenizers

    def load_text_encoders(self, folder, variant, dtype):
        return [load_flax_text_encoder(folder, variant, dtype, name) for name in self.family.text_encoders]

    def vae_dtype(self, vae_config, weight_dtype):
        """The dtype the VAE runs in: the mixed-precision one, unless the family honours the VAE's own request for
        fp32 (force_upcast: SDXL's VAE overflows in fp16; an fp16-safe VAE says otherwise)."""
        if self.family.honours_vae_force_upcast and vae_config.get("force_upcast", True):
            return jnp.float32
        return weight_dtype

    def encode_text(self, text_encoders, text_encoder_params, input_ids):
        """(encoder_hidden_states, pooled text embedding or None) from token ids [batch, encoders, tokens]: here the
        text encoder's last hidden state, and no pooled embedding."""
        return text_encoders[0](input_ids[:, 0], params=text_encoder_params[0], train=False)[0], None

    def added_conditioning(self, pooled, time_ids):
        """The UNet's added_cond_kwargs: none."""
        return None


class SDXLCode(SDCode):
    """Stable Diffusion XL: two CLIP text encoders, and the pooled text embedding and size conditioning added to the
    UNet's time embedding (Podell et al. 2023, arXiv:2307.01952)."""

    pipeline_class = FlaxStableDiffusionXLPipeline

    def encode_text(self, text_encoders, text_encoder_params, input_ids):
        """Both encoders' penultimate hidden states side by side (sec. 2.1), and the second's pooled projection."""
        hidden_states = []
        for index, (text_encoder, params) in enumerate(zip(text_encoders, text_encoder_params, strict=True)):
            output = text_encoder(input_ids[:, index], params=params, train=False, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
        return jnp.concatenate(hidden_states, axis=-1), output[0]  # output[0]: the second encoder's text_embeds

    def added_conditioning(self, pooled, time_ids):
        """The pooled text embedding and the size and crop time ids (sec. 2.2)."""
        return {"text_embeds": pooled, "time_ids": time_ids}


FAMILY_CODE = {"sd": SDCode, "sdxl": SDXLCode}


def family_code(family):
    """The JAX code of a Family."""
    return FAMILY_CODE[family.name](family)
