"""Token ids for the text encoders, and SDXL's text encoders saved in the hub's key layout."""

import json
import os

import safetensors.torch
import torch


def tokenize(tokenizer, captions, indices):
    """Token ids of captions[i] for i in indices, padded (or cut) to the text encoder's context length."""
    selected = [captions[i] for i in indices]
    padding = dict(max_length=tokenizer.model_max_length, padding="max_length", truncation=True)
    return tokenizer(selected, return_tensors="pt", **padding).input_ids


def write_hub_style_text_encoder(text_encoder_dir):
    """transformers 5 saves CLIPTextModel weights without the 'text_model.' key prefix that hub checkpoints carry and
    that transformers 4, the Flax twins and single-file converters expect (they silently load random weights
    otherwise). transformers 5 reads both layouts, so rewrite the saved file(s) with the prefix."""

    def hub_key(key):
        return "text_model." + key if key.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") else key

    index_path = os.path.join(text_encoder_dir, "model.safetensors.index.json")
    names = ["model.safetensors", "pytorch_model.bin"]
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        names = sorted(set(index["weight_map"].values()))
        index["weight_map"] = {hub_key(k): v for k, v in index["weight_map"].items()}
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    for name in names:
        path = os.path.join(text_encoder_dir, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".safetensors"):
            state = safetensors.torch.load_file(path)
            safetensors.torch.save_file({hub_key(k): v for k, v in state.items()}, path, metadata={"format": "pt"})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            torch.save({hub_key(k): v for k, v in state.items()}, path)


def text_components(text_encoders, tokenizers):
    """The text encoders and tokenizers by their pipeline names: text_encoder, tokenizer (and SDXL's text_encoder_2,
    tokenizer_2)."""
    components = {}
    for index, (text_encoder, tokenizer) in enumerate(zip(text_encoders, tokenizers, strict=True)):
        suffix = f"_{index + 1}" if index else ""
        components["text_encoder" + suffix], components["tokenizer" + suffix] = text_encoder, tokenizer
    return components


def encode_text(text_encoders, input_ids):
    """The UNet's text conditioning from token ids [batch, encoders, tokens], on the encoders' device. SD 1.x / 2.x:
    the text encoder's last hidden state. SDXL: (both encoders' penultimate hidden states side by side, the second's
    pooled projection)."""
    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[:, 0], return_dict=False)[0]
    hidden_states = []
    for text_encoder, ids in zip(text_encoders, input_ids.unbind(1), strict=True):
        output = text_encoder(ids, output_hidden_states=True)
        # SDXL reads the penultimate layer of each encoder (Podell et al. 2023, arXiv:2307.01952, sec. 2.1).
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output[0]  # output[0]: the second encoder's text_embeds
