"""Token ids for the text encoders, and saved text encoders rewritten in the hub's key layout."""

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
