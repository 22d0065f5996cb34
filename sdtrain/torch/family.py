"""The PyTorch code of each model family (sdtrain.families.Family): which tokenizers and text encoders it loads, how
its text conditions the UNet, and its diffusers pipeline. family_code(family) gives the code for a Family; the JAX
adapter (sdtrain/jax/family.py) has the same method names. A new family is one more class here, registered in
FAMILY_CODE, and one more Family in sdtrain/families.py: no SD or SDXL code changes."""

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdtrain.torch.models import load_component, load_model


class SDCode:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, whose last hidden state conditions the UNet through
    cross-attention, and no added conditioning."""

    pipeline_class = StableDiffusionPipeline
    text_encoder_classes = (CLIPTextModel,)

    def __init__(self, family):
        self.family = family

    def load_tokenizers(self, source, tokenizer_name=None):
        """One tokenizer per text encoder, from the source pipeline (a ModelSource); tokenizer_name (a hub id or
        folder: --tokenizer_name) replaces the first."""
        tokenizers = []
        for name in self.family.tokenizers:
            if tokenizer_name and not tokenizers:
                tokenizers.append(
                    load_model(CLIPTokenizer, tokenizer_name, "", "--tokenizer_name", cache_dir=source.cache_dir)
                )
            else:
                tokenizers.append(load_component(CLIPTokenizer, source, name))
        return tokenizers

    def load_text_encoders(self, source, variant=None):
        """The text encoders of the source pipeline, in order, each load error naming the component and the path."""
        pairs = zip(self.text_encoder_classes, self.family.text_encoders, strict=True)
        return [load_component(cls, source, name, variant=variant) for cls, name in pairs]

    def encode_text(self, text_encoders, input_ids):
        """(encoder_hidden_states, pooled text embedding or None) from token ids [batch, encoders, tokens], on the
        encoders' device: here the text encoder's last hidden state, and no pooled embedding."""
        return text_encoders[0](input_ids[:, 0], return_dict=False)[0], None

    def added_conditioning(self, pooled, time_ids):
        """The UNet's added_cond_kwargs; None: this family's UNet takes none."""
        return None

    def components(self, text_encoders, tokenizers):
        """The text encoders and tokenizers by their pipeline names (text_encoder, tokenizer, ...)."""
        components = dict(zip(self.family.text_encoders, text_encoders, strict=True))
        components.update(zip(self.family.tokenizers, tokenizers, strict=True))
        return components

    def validation_components(self):
        """Components a pipeline that renders validation images goes without: SD pipelines' safety checker, which
        would black out images of a half-trained model."""
        return {"safety_checker": None}

    def vae_dtype(self, vae_config, weight_dtype):
        """The VAE's dtype under mixed precision: weight_dtype, or fp32 where the family honours the VAE config's
        force_upcast (SDXL's VAE overflows in fp16 and says so; an fp16-safe VAE says otherwise)."""
        upcast = self.family.honours_vae_force_upcast and vae_config.force_upcast
        return torch.float32 if upcast else weight_dtype


class SDXLCode(SDCode):
    """Stable Diffusion XL: two CLIP text encoders, whose penultimate hidden states side by side condition the UNet
    through cross-attention, and the second's pooled embedding with the size conditioning through its added embedding
    (Podell et al. 2023, arXiv:2307.01952, sec. 2.1-2.2)."""

    pipeline_class = StableDiffusionXLPipeline
    text_encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)

    def encode_text(self, text_encoders, input_ids):
        hidden_states = []
        for text_encoder, ids in zip(text_encoders, input_ids.unbind(1), strict=True):
            output = text_encoder(ids, output_hidden_states=True)
            # SDXL reads the penultimate layer of each encoder (Podell et al. 2023, sec. 2.1).
            hidden_states.append(output.hidden_states[-2])
        return torch.cat(hidden_states, dim=-1), output[0]  # output[0]: the second encoder's text_embeds

    def added_conditioning(self, pooled, time_ids):
        return {"text_embeds": pooled, "time_ids": time_ids}

    def validation_components(self):
        return {}  # SDXL pipelines have no safety checker


FAMILY_CODE = {"sd": SDCode, "sdxl": SDXLCode}


def family_code(family):
    """The PyTorch code of a Family (sdtrain.families), by its name."""
    return FAMILY_CODE[family.name](family)
