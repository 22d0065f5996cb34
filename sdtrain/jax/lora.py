"""LoRA for the Flax twins (sdtrain.lora says what the flags mean and which files a run writes): the adapter is a
pytree of A/B matrices beside the frozen params, one {"lora_A", "lora_B"} pair per adapted Dense layer, nested along
the layer's Flax param path. merge_lora folds it into the frozen kernels, W + scale * B @ A, inside the loss, so that
only A and B receive gradients and optimizer state while the base params stay untouched.

Flax names the layers differently from the PyTorch modules that sdtrain.lora and the saved files use: diffusers' Flax
UNet writes a block index into the name (down_blocks_0, to_out_0, net_0) where PyTorch has a submodule (down_blocks.0,
to_out.0, net.0); transformers' Flax CLIP keeps PyTorch's layout (encoder/layers/0). A Flax Dense kernel is the
transposed PyTorch weight, (in, out), so the merged kernel is kernel + scale * (B @ A).T.

With bf16 base weights the merged kernel is computed in fp32 and rounded to bf16 by the layer, like the base weights
themselves: the part of an update smaller than half of W's bf16 step shows in the gradients (which reach A and B in
fp32) but not yet in the forward pass. PyTorch under autocast rounds the LoRA branch's output instead. Both are within
bf16's own precision; the parity test holds the two frameworks to each other in fp32.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from sdtrain.lora import TEXT_ENCODER_LORA_MODULES, UNET_LORA_MODULES, diffusers_key

# The Flax param path (within a transformer block's attention or feed-forward) of each PyTorch module name LoRA adapts.
UNET_FLAX_PATHS = {
    "to_q": ("to_q",),
    "to_k": ("to_k",),
    "to_v": ("to_v",),
    "to_out.0": ("to_out_0",),
    "ff.net.0.proj": ("ff", "net_0", "proj"),
    "ff.net.2": ("ff", "net_2"),
}
TEXT_ENCODER_FLAX_PATHS = {name: (name,) for name in TEXT_ENCODER_LORA_MODULES}
assert set(UNET_FLAX_PATHS) == set(UNET_LORA_MODULES)


def adapted_layers(params, modules, flax_paths):
    """The Flax paths (tuples of names, without "kernel") of the Dense layers of `params` that end in one of
    `modules` (PyTorch names, translated by `flax_paths`), in a fixed order."""
    tails = [flax_paths[module] for module in modules]
    found = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(str(getattr(key, "key", key)) for key in path)
        if names[-1] == "kernel" and any(names[-1 - len(tail) : -1] == tail for tail in tails):
            found.append(names[:-1])
    return sorted(found)


def unet_module_name(path):
    """The PyTorch (diffusers) module name of a Flax UNet layer: an index the Flax name carries ("down_blocks_0",
    "to_out_0", "net_0") is PyTorch's submodule ("down_blocks.0", "to_out.0", "net.0")."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", name) for name in path)


def text_encoder_module_name(path):
    """The PyTorch (transformers) module name of a Flax CLIP layer: the same names, dotted."""
    return ".".join(path)


def module_name(component, path):
    return unet_module_name(path) if component == "unet" else text_encoder_module_name(path)


def lookup(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def init_lora(params, component, modules, rank, rng):
    """A fresh adapter of `rank` for the layers of one component's params (component: "unet" or a text encoder's
    name; modules: PyTorch module names of that component), in float32. A is drawn as peft draws it (Kaiming-uniform
    with a = sqrt(5): uniform within +-1/sqrt(in)), B is zero, so the adapted model starts as the base model."""
    flax_paths = UNET_FLAX_PATHS if component == "unet" else TEXT_ENCODER_FLAX_PATHS
    layers = adapted_layers(params, modules, flax_paths)
    if not layers:
        raise ValueError(f"{component} has none of the layers {', '.join(modules)}")
    adapter = {}
    for index, path in enumerate(layers):
        fan_in, fan_out = lookup(params, path)["kernel"].shape
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, index), (rank, fan_in), jnp.float32, -bound, bound)
        node = adapter
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = {"lora_A": a, "lora_B": jnp.zeros((fan_out, rank), jnp.float32)}
    return adapter


def merge_lora(params, lora, scale):
    """`params` with every adapted kernel replaced by kernel + scale * (B @ A).T (in float32, which the module casts
    to its compute dtype); every other leaf is the same object. Pure, for use inside the loss: the gradient of the
    result reaches A and B."""
    if "lora_A" in lora:
        delta = scale * (lora["lora_B"] @ lora["lora_A"]).T
        return {**params, "kernel": params["kernel"].astype(jnp.float32) + delta}
    merged = dict(params)
    for name, sub in lora.items():
        merged[name] = merge_lora(params[name], sub, scale)
    return merged


def adapter_layers(lora):
    """(Flax path, {"lora_A", "lora_B"}) of every layer of one component's adapter."""
    if "lora_A" in lora:
        return [((), lora)]
    return [((name, *path), pair) for name, sub in sorted(lora.items()) for path, pair in adapter_layers(sub)]


def adapter_state(lora):
    """The adapter ({component: adapter}) as float32 NumPy arrays keyed by sdtrain.lora.diffusers_key, what
    sdtrain.lora.write_lora_files writes. A is (rank, in), B (out, rank), as in PyTorch."""
    state = {}
    for component, adapter in lora.items():
        for path, pair in adapter_layers(adapter):
            module = module_name(component, path)
            state[diffusers_key(component, module, "A")] = np.asarray(jax.device_get(pair["lora_A"]), np.float32)
            state[diffusers_key(component, module, "B")] = np.asarray(jax.device_get(pair["lora_B"]), np.float32)
    return state


def from_adapter_state(state, lora):
    """The inverse of adapter_state: an adapter shaped like `lora` with the matrices of `state` (the parity test
    sets the PyTorch side's A and B this way)."""
    result = {}
    for component, adapter in lora.items():
        for path, _ in adapter_layers(adapter):
            module = module_name(component, path)
            node = result.setdefault(component, {})
            for name in path:
                node = node.setdefault(name, {})
            node["lora_A"] = jnp.asarray(state[diffusers_key(component, module, "A")])
            node["lora_B"] = jnp.asarray(state[diffusers_key(component, module, "B")])
    return result


def add_adapters(config, unet_params, text_encoder_params, seed):
    """The adapter a LoRA run (an sdtrain.lora.LoraConfig) starts from, {component: A/B pytree}: the UNet's, and with
    config.train_text_encoder the text encoders' (text_encoder_params: {component name: params}). A is drawn from the
    run's seed, so it is the same on every process; B is zero, so training starts from the base model."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed % (2**31)), 0x10A)
    adapter = {"unet": init_lora(unet_params, "unet", config.unet_modules, config.rank, jax.random.fold_in(rng, 0))}
    if config.train_text_encoder:
        for index, (name, params) in enumerate(text_encoder_params.items(), start=1):
            modules = TEXT_ENCODER_LORA_MODULES
            adapter[name] = init_lora(params, name, modules, config.rank, jax.random.fold_in(rng, index))
    return adapter
