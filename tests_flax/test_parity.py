"""Same weights, same batch, same noise and timesteps: the PyTorch compute_loss and the JAX train_step agree (fp32)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, run_torch

import train_text_to_image_flax as T


@pytest.fixture(scope="module")
def flax_models(assets):
    from diffusers import FlaxAutoencoderKL, FlaxDDPMScheduler, FlaxUNet2DConditionModel

    folder = assets["pipeline"]
    vae, vae_params = T.load_flax_model(FlaxAutoencoderKL, folder, "vae", None, jnp.float32)
    unet, unet_params = T.load_flax_model(FlaxUNet2DConditionModel, folder, "unet", None, jnp.float32)
    noise_scheduler, scheduler_state = FlaxDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return dict(
        text_encoder=T.load_flax_text_encoder(folder, None, jnp.float32),
        vae=vae,
        vae_params=vae_params,
        unet=unet,
        unet_params=unet_params,
        noise_scheduler=noise_scheduler,
        scheduler_state=scheduler_state,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_pytorch_compute_loss_equals_jax_train_step(
    assets, flax_models, tmp_path, monkeypatch, prediction_type, snr_gamma
):
    npz = str(tmp_path / "torch.npz")
    run_torch(
        [
            os.path.join(REPO, "tests_flax", "torch_loss.py"),
            assets["pipeline"],
            prediction_type,
            str(snr_gamma or "none"),
            npz,
        ]
    )
    torch_side = np.load(npz)

    m = flax_models
    state = T.TrainState.create(
        apply_fn=m["unet"].apply,
        params=m["unet_params"],
        tx=optax.sgd(0.0),
        vae_params=m["vae_params"],
        text_encoder_params=m["text_encoder"].params,
        scheduler_state=m["scheduler_state"],
        vae=m["vae"],
        text_encoder=m["text_encoder"],
        noise_scheduler=m["noise_scheduler"],
        config=T.LossConfig(prediction_type, snr_gamma, 0.0, m["vae"].config.scaling_factor),
    )
    # Hand train_step the noise and timesteps the PyTorch generator drew.
    monkeypatch.setattr(
        jax.random, "normal", lambda key, shape, dtype=jnp.float32: jnp.asarray(torch_side["noise"], dtype)
    )
    monkeypatch.setattr(jax.random, "randint", lambda key, shape, minval, maxval: jnp.asarray(torch_side["timesteps"]))
    batch = {"latents": jnp.asarray(torch_side["latents"]), "input_ids": jnp.asarray(torch_side["input_ids"])}
    _, metrics = T.train_step(state, batch, jax.random.PRNGKey(0))
    assert abs(float(metrics["loss"]) - float(torch_side["loss"])) <= 1e-4, (
        float(metrics["loss"]),
        float(torch_side["loss"]),
    )


def test_min_snr_cases_differ(assets, tmp_path):
    """The draw includes a low-noise timestep, so Min-SNR changes the epsilon loss: the parity cases have teeth."""
    losses = {}
    for gamma in ("none", "5.0"):
        npz = str(tmp_path / f"{gamma}.npz")
        run_torch([os.path.join(REPO, "tests_flax", "torch_loss.py"), assets["pipeline"], "epsilon", gamma, npz])
        losses[gamma] = float(np.load(npz)["loss"])
    assert abs(losses["none"] - losses["5.0"]) > 1e-3
