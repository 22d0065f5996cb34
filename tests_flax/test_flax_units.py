"""Pieces of the Flax twins checked in-process: the learning-rate schedules, block rematerialisation, and that the
JAX train_step keeps the PyTorch compute_loss's names and comments."""

import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

import train_text_to_image_flax as T


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_lr_scheduler_and_warmup_are_honoured(name):
    args = types.SimpleNamespace(lr_scheduler=name, learning_rate=1.0, lr_warmup_steps=10)
    schedule = T.learning_rate_schedule(args, max_train_steps=110)
    lr = np.array([float(schedule(step)) for step in range(111)])
    if name == "constant":  # as in diffusers' get_scheduler: 'constant' ignores warmup
        assert np.allclose(lr, 1.0)
        return
    assert np.allclose(lr[:11], np.arange(11) / 10)  # linear warmup to the peak
    if name == "constant_with_warmup":
        assert np.allclose(lr[10:], 1.0)
    elif name == "linear":
        assert np.allclose(lr[10:], 1.0 - np.arange(101) / 100)
    else:
        assert np.allclose(lr[10:], 0.5 * (1 + np.cos(np.pi * np.arange(101) / 100)), atol=1e-6)


def test_gradient_checkpointing_rematerialises_every_unet_block(assets):
    from diffusers import FlaxUNet2DConditionModel

    T.enable_block_rematerialisation()
    unet, params = T.load_flax_model(FlaxUNet2DConditionModel, assets["pipeline"], "unet", None, jnp.float32)

    def loss(p):
        return unet.apply(
            {"params": p}, jnp.ones((1, 4, 8, 8)), jnp.array([3]), jnp.ones((1, 77, 32)), train=True
        ).sample.mean()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    # Two down blocks, the mid block and two up blocks, each under its own checkpoint.
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 5, "no rematerialised blocks in the gradient"


def math_comments(script):
    """The comment lines between the BEGIN MATH and END MATH rulers of a script."""
    text = open(os.path.join(REPO, script)).read()
    math = text.split("BEGIN MATH", 1)[1].split("END MATH", 1)[0]
    return [line.strip() for line in math.splitlines() if line.strip().startswith("#")]


def math_names(script):
    text = open(os.path.join(REPO, script)).read().split("BEGIN MATH", 1)[1].split("END MATH", 1)[0]
    return {
        n
        for n in ["latents", "noise", "timesteps", "noisy_latents", "encoder_hidden_states", "model_pred", "target"]
        if re.search(rf"\b{n}\b", text)
    }


@pytest.mark.parametrize(
    "flax_script,torch_script",
    [("train_text_to_image_flax.py", "train_text_to_image.py"), ("textual_inversion_flax.py", "textual_inversion.py")],
)
def test_train_step_and_compute_loss_diff_cleanly(flax_script, torch_script):
    flax_comments, torch_comments = math_comments(flax_script), math_comments(torch_script)
    # Every comment of the JAX math is a comment of the PyTorch math, in the same order; the PyTorch side may have
    # more (features the Flax twin does not carry: input perturbation, DREAM).
    assert [c for c in torch_comments if c in flax_comments] == flax_comments
    assert len(flax_comments) >= 6
    assert (
        math_names(flax_script)
        == math_names(torch_script)
        == {"latents", "noise", "timesteps", "noisy_latents", "encoder_hidden_states", "model_pred", "target"}
    )


def definitions(script):
    """Top-level functions, classes and assignments of a script, as source text by name (read, not imported)."""
    import ast

    text = open(os.path.join(REPO, script)).read()
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(text, node)
    return found


SHARED = {
    # Each script stands alone, so these helpers are copies; they must stay identical copies.
    ("train_text_to_image_flax.py", "textual_inversion_flax.py"): [
        "derive_seed",
        "list_checkpoints",
        "find_resume_checkpoint",
        "epoch_batches",
        "resolve_pipeline_folder",
        "load_flax_model",
        "load_flax_text_encoder",
        "enable_block_rematerialisation",
        "learning_rate_schedule",
        "LossConfig",
        "checkpoint_payload",
        "save_checkpoint",
        "CHECKPOINT_PATTERN",
        "TRAINING_STATE",
        "LogWindow",
        "format_logs",
    ],
    ("train_text_to_image.py", "train_text_to_image_flax.py"): [
        "derive_seed",
        "list_checkpoints",
        "find_resume_checkpoint",
        "load_image_caption_dataset",
        "format_logs",
    ],
    ("textual_inversion.py", "textual_inversion_flax.py"): [
        "derive_seed",
        "find_example_images",
        "add_placeholder_tokens",
        "initializer_token_id",
        "OBJECT_TEMPLATES",
        "STYLE_TEMPLATES",
        "IMAGE_EXTENSIONS",
    ],
}


@pytest.mark.parametrize("pair", sorted(SHARED))
def test_copied_helpers_stay_identical(pair):
    a, b = definitions(pair[0]), definitions(pair[1])
    for name in SHARED[pair]:
        assert a[name] == b[name], f"{name} differs between {pair[0]} and {pair[1]}"
