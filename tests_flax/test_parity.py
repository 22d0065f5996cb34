"""Same weights, same latents, same prompts, same random draws: each script's pure diffusion_loss agrees with its
PyTorch twin's (fp32, within 1e-4), for every option of the loss. The PyTorch half (torch_side.py) records every draw
its generator made; here the JAX draws are replaced by those, one by one, in order, so the check also proves that both
twins draw the same shapes in the same order. Textual inversion compares the gradient for the new rows as well."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_torch
from parity_cases import (
    CASES,
    INITIALIZER,
    LORA_ALPHA,
    LORA_CASES,
    LORA_RANK,
    NUM_VECTORS,
    PLACEHOLDER,
    SDXL_CAPTION_KEPT,
    SDXL_CASE,
    SDXL_TEXTUAL_INVERSION,
    SDXL_TIME_IDS,
    TEXT_TO_IMAGE,
    VALIDATION_LOSS_CASES,
    VALIDATION_LOSS_SEED,
    VALIDATION_LOSS_TIMESTEPS,
)

import textual_inversion_flax
import train_text_to_image_flax
from sdtrain.families import SD, SDXL
from sdtrain.jax import lora as jax_lora
from sdtrain.jax import models as jax_models
from sdtrain.jax.family import family_code
from sdtrain.lora import TEXT_ENCODER_LORA_MODULES, UNET_LORA_MODULES, LoraConfig


@pytest.fixture(scope="module")
def torch_side(assets, sdxl_pipeline, tmp_path_factory):
    """Runs the PyTorch half once for every case; the folder of its .npz files."""
    out = str(tmp_path_factory.mktemp("torch_side"))
    run_torch([os.path.join(REPO, "tests_flax", "torch_side.py"), assets["pipeline"], sdxl_pipeline, out])
    return out


@pytest.fixture(scope="module")
def flax_models(assets):
    from diffusers import FlaxDDPMScheduler, FlaxUNet2DConditionModel

    folder = assets["pipeline"]
    unet, unet_params = jax_models.load_flax_model(FlaxUNet2DConditionModel, folder, "unet", None, jnp.float32)
    noise_scheduler, scheduler_state = FlaxDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder = jax_models.load_flax_text_encoder(folder, None, jnp.float32)
    models = dict(unet=unet, unet_params=unet_params, noise_scheduler=noise_scheduler, scheduler_state=scheduler_state)
    models["folder"] = folder
    return {**models, "text_encoder": text_encoder}


def replay_draws(monkeypatch, recorded):
    """jax.random.normal, .uniform and .randint hand out the PyTorch draws in order; each must have the shape asked."""
    queue = [recorded[f"draw_{i}"] for i in range(sum(k.startswith("draw_") for k in recorded.files))]

    def next_draw(shape, dtype):
        assert queue, "JAX drew more often than PyTorch"
        draw = queue.pop(0)
        assert tuple(shape) == draw.shape, f"JAX drew shape {tuple(shape)} where PyTorch drew {draw.shape}"
        return jnp.asarray(draw, dtype)

    monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype=jnp.float32: next_draw(shape, dtype))
    monkeypatch.setattr(jax.random, "randint", lambda key, shape, minval, maxval: next_draw(shape, jnp.int32))
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape, dtype=jnp.float32: next_draw(shape, dtype))
    return queue


def with_zero_terminal_snr(models, recorded):
    """`models` with the Flax twins' zero-terminal-SNR schedule, which must equal diffusers' PyTorch one."""
    noise_scheduler, scheduler_state = jax_models.load_noise_scheduler(models["folder"], rescale_betas_zero_snr=True)
    alphas_cumprod = np.asarray(scheduler_state.common.alphas_cumprod)
    assert alphas_cumprod[-1] == 0 and recorded["alphas_cumprod"][-1] == 0
    np.testing.assert_allclose(alphas_cumprod, recorded["alphas_cumprod"], atol=1e-6)
    return {**models, "noise_scheduler": noise_scheduler, "scheduler_state": scheduler_state}


def bound_loss(script, models):
    """script.diffusion_loss with the UNet and the noise scheduler of `models` filled in."""

    def unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        variables = {"params": models["unet_params"]}
        return (
            models["unet"]
            .apply(
                variables,
                noisy_latents,
                timesteps,
                encoder_hidden_states,
                added_cond_kwargs=added_cond_kwargs,
                train=True,
            )
            .sample
        )

    return functools.partial(script.diffusion_loss, unet, models["noise_scheduler"], models["scheduler_state"])


@pytest.mark.parametrize("case", sorted(TEXT_TO_IMAGE))
def test_text_to_image_loss_equals_pytorch(torch_side, flax_models, monkeypatch, case):
    recorded = np.load(os.path.join(torch_side, f"{case}.npz"))
    m = flax_models
    encoder_hidden_states = m["text_encoder"](jnp.asarray(recorded["input_ids"]), params=m["text_encoder"].params)[0]
    queue = replay_draws(monkeypatch, recorded)
    fields = dict(CASES[case])
    weights = fields.pop("sample_weights", None)
    sample_weights = None if weights is None else jnp.asarray(weights, jnp.float32)
    mask = fields.pop("mask", None)
    if fields.pop("zero_snr", False):
        m = with_zero_terminal_snr(m, recorded)
    config = train_text_to_image_flax.LossConfig(**fields)
    diffusion_loss = bound_loss(train_text_to_image_flax, m)
    latents, rng = jnp.asarray(recorded["latents"]), jax.random.PRNGKey(0)
    loss = diffusion_loss(latents, encoder_hidden_states, rng, config, sample_weights, mask=mask)
    assert not queue, "PyTorch drew more often than JAX"
    assert abs(float(loss) - float(recorded["loss"])) <= 1e-4, (float(loss), float(recorded["loss"]))


def test_sdxl_loss_equals_pytorch(torch_side, sdxl_pipeline, monkeypatch):
    """The tiny SDXL pipeline in both frameworks: the family's encode_text (both encoders' penultimate states side by
    side, the second's pooled projection), a dropped caption conditioned on zeros, per-sample size conditioning and
    Min-SNR: the same loss."""
    from diffusers import FlaxDDPMScheduler, FlaxUNet2DConditionModel

    name, fields = SDXL_CASE
    recorded = np.load(os.path.join(torch_side, f"{name}.npz"))
    unet, unet_params = jax_models.load_flax_model(FlaxUNet2DConditionModel, sdxl_pipeline, "unet", None, jnp.float32)
    noise_scheduler, scheduler_state = FlaxDDPMScheduler.from_pretrained(sdxl_pipeline, subfolder="scheduler")
    text_encoders = [
        jax_models.load_flax_text_encoder(sdxl_pipeline, None, jnp.float32, n)
        for n in ("text_encoder", "text_encoder_2")
    ]
    text_encoder_params = [text_encoder.params for text_encoder in text_encoders]
    encoder_hidden_states, pooled_text_embeds = family_code(SDXL).encode_text(
        text_encoders, text_encoder_params, jnp.asarray(recorded["input_ids"])
    )
    kept = jnp.asarray(SDXL_CAPTION_KEPT)
    added_cond_kwargs = {
        "text_embeds": pooled_text_embeds * kept[:, None],
        "time_ids": jnp.asarray(SDXL_TIME_IDS, jnp.float32),
    }
    models = dict(unet=unet, unet_params=unet_params, noise_scheduler=noise_scheduler, scheduler_state=scheduler_state)
    diffusion_loss = functools.partial(
        bound_loss(train_text_to_image_flax, models),
        jnp.asarray(recorded["latents"]),
        encoder_hidden_states * kept[:, None, None],
        jax.random.PRNGKey(0),
        train_text_to_image_flax.LossConfig(**fields),
    )
    queue = replay_draws(monkeypatch, recorded)
    loss = diffusion_loss(added_cond_kwargs=added_cond_kwargs)
    assert not queue, "PyTorch drew more often than JAX"
    assert abs(float(loss) - float(recorded["loss"])) <= 1e-4, (float(loss), float(recorded["loss"]))
    # The case has teeth: the size conditioning and the pooled embedding each change the loss.
    for key in ("time_ids", "text_embeds"):
        replay_draws(monkeypatch, recorded)
        other = diffusion_loss(added_cond_kwargs={**added_cond_kwargs, key: added_cond_kwargs[key] * 0})
        assert abs(float(other) - float(loss)) > 1e-4, key


@pytest.mark.parametrize("case", sorted(set(CASES) - set(TEXT_TO_IMAGE)))
def test_textual_inversion_loss_and_gradient_equal_pytorch(assets, torch_side, flax_models, monkeypatch, case):
    """The new rows enter the text encoder (with_learned_rows), its output conditions the UNet: loss and gradient."""
    recorded = np.load(os.path.join(torch_side, f"{case}.npz"))
    from transformers import CLIPTokenizerFast

    m = flax_models
    tokenizer = CLIPTokenizerFast.from_pretrained(assets["pipeline"], subfolder="tokenizer")
    token = (PLACEHOLDER, INITIALIZER, NUM_VECTORS)
    _, placeholder_ids, _, text_encoder = textual_inversion_flax.add_learned_embedding(
        m["text_encoder"], tokenizer, *token
    )
    input_ids = jnp.asarray(recorded["input_ids"])
    assert set(placeholder_ids) <= set(np.asarray(input_ids).ravel().tolist()), "the prompts must use every new row"
    fields = dict(CASES[case])
    mask = fields.pop("mask", None)
    config = textual_inversion_flax.LossConfig(**fields)
    diffusion_loss = bound_loss(textual_inversion_flax, m)

    def loss_fn(rows):
        params = textual_inversion_flax.with_learned_rows(m["text_encoder"].params, rows)
        encoder_hidden_states = text_encoder(input_ids, params=params, train=False)[0]
        latents, rng = jnp.asarray(recorded["latents"]), jax.random.PRNGKey(0)
        return diffusion_loss(latents, encoder_hidden_states, rng, config, mask=mask)

    queue = replay_draws(monkeypatch, recorded)
    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(recorded["learned"]))
    assert not queue, "PyTorch drew more often than JAX"
    assert abs(float(loss) - float(recorded["loss"])) <= 1e-4, (float(loss), float(recorded["loss"]))
    expected = recorded["learned_grad"]
    assert np.abs(expected).max() > 0, "the gradient must reach the new rows for the check to bite"
    assert np.abs(np.asarray(grad) - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("case", sorted(SDXL_TEXTUAL_INVERSION))
def test_sdxl_textual_inversion_loss_and_gradients_equal_pytorch(sdxl_pipeline, torch_side, monkeypatch, case):
    """SDXL: each encoder's new rows enter its table, both penultimate states and the second encoder's pooled
    embedding (the family's encode_text) condition the UNet with the recorded size conditioning: the loss, and the
    gradient for each encoder's rows."""
    recorded = np.load(os.path.join(torch_side, f"{case}.npz"))
    from diffusers import FlaxDDPMScheduler, FlaxUNet2DConditionModel
    from transformers import CLIPTokenizerFast

    folder = sdxl_pipeline
    unet, unet_params = jax_models.load_flax_model(FlaxUNet2DConditionModel, folder, "unet", None, jnp.float32)
    noise_scheduler, scheduler_state = FlaxDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    models = dict(unet=unet, unet_params=unet_params, noise_scheduler=noise_scheduler, scheduler_state=scheduler_state)
    text_encoders = [
        jax_models.load_flax_text_encoder(folder, None, jnp.float32),
        jax_models.load_flax_text_encoder(folder, None, jnp.float32, "text_encoder_2"),
    ]
    input_ids = jnp.asarray(recorded["input_ids"])
    extended_text_encoders = []
    for index, text_encoder in enumerate(text_encoders):
        tokenizer = CLIPTokenizerFast.from_pretrained(folder, subfolder=["tokenizer", "tokenizer_2"][index])
        token = (PLACEHOLDER, INITIALIZER, NUM_VECTORS)
        _, placeholder_ids, _, extended = textual_inversion_flax.add_learned_embedding(text_encoder, tokenizer, *token)
        assert set(placeholder_ids) <= set(np.asarray(input_ids[:, index]).ravel().tolist()), "every new row is used"
        extended_text_encoders.append(extended)
    config = textual_inversion_flax.LossConfig(**SDXL_TEXTUAL_INVERSION[case])
    diffusion_loss = bound_loss(textual_inversion_flax, models)
    keys = [textual_inversion_flax.learned_key(index) for index in range(2)]

    def loss_fn(rows):
        with_rows = textual_inversion_flax.with_learned_rows
        params = [with_rows(encoder.params, rows[key]) for encoder, key in zip(text_encoders, keys, strict=True)]
        encoder_hidden_states, text_embeds = family_code(SDXL).encode_text(extended_text_encoders, params, input_ids)
        added_cond_kwargs = {"text_embeds": text_embeds, "time_ids": jnp.asarray(recorded["time_ids"])}
        latents, rng = jnp.asarray(recorded["latents"]), jax.random.PRNGKey(0)
        return diffusion_loss(latents, encoder_hidden_states, rng, config, added_cond_kwargs=added_cond_kwargs)

    queue = replay_draws(monkeypatch, recorded)
    loss, grads = jax.value_and_grad(loss_fn)({key: jnp.asarray(recorded[key]) for key in keys})
    assert not queue, "PyTorch drew more often than JAX"
    assert abs(float(loss) - float(recorded["loss"])) <= 1e-4, (float(loss), float(recorded["loss"]))
    for key in keys:
        expected = recorded[f"{key}_grad"]
        assert np.abs(expected).max() > 0, f"the gradient must reach {key} for the check to bite"
        assert np.abs(np.asarray(grads[key]) - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max()), key


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_loss_and_gradients_equal_pytorch(assets, sdxl_pipeline, torch_side, monkeypatch, case):
    """A LoRA on every UNet module it may adapt and on the text encoders' attention (--train_text_encoder), with the
    A and B peft held on the PyTorch side: the layers have the same PyTorch names (the Flax paths map to peft's
    modules), and the script's adapted_weights (the adapter merged into the frozen params), the family's encode_text
    and diffusion_loss give the same loss and the same gradient for every A and B."""
    from diffusers import FlaxDDPMScheduler, FlaxUNet2DConditionModel

    recorded = np.load(os.path.join(torch_side, f"{case}.npz"))
    family = SDXL if case.startswith("lora_sdxl") else SD
    folder = sdxl_pipeline if family is SDXL else assets["pipeline"]
    code = family_code(family)
    unet, unet_params = jax_models.load_flax_model(FlaxUNet2DConditionModel, folder, "unet", None, jnp.float32)
    noise_scheduler, scheduler_state = FlaxDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoders = tuple(code.load_text_encoders(folder, None, jnp.float32))
    lora = LoraConfig(LORA_RANK, LORA_ALPHA, 0.0, UNET_LORA_MODULES, train_text_encoder=True)
    frozen = train_text_to_image_flax.FrozenModels(
        vae_params=None,
        text_encoder_params=tuple(text_encoder.params for text_encoder in text_encoders),
        scheduler_state=scheduler_state,
        vae=None,
        text_encoders=text_encoders,
        noise_scheduler=noise_scheduler,
        code=code,
        unet_params=unet_params,
        lora=lora,
    )
    layout = {"unet": jax_lora.init_lora(unet_params, "unet", UNET_LORA_MODULES, LORA_RANK, jax.random.PRNGKey(0))}
    for name, text_encoder in zip(family.text_encoders, text_encoders, strict=True):
        modules = TEXT_ENCODER_LORA_MODULES
        layout[name] = jax_lora.init_lora(text_encoder.params, name, modules, LORA_RANK, jax.random.PRNGKey(0))
    keys = {key for key in recorded.files if ".lora_" in key and not key.startswith("grad:")}
    assert set(jax_lora.adapter_state(layout)) == keys, "the Flax layers are peft's modules, by name"
    adapter = jax_lora.from_adapter_state(recorded, layout)
    input_ids, latents = jnp.asarray(recorded["input_ids"]), jnp.asarray(recorded["latents"])
    config = train_text_to_image_flax.LossConfig(**LORA_CASES[case])

    def loss_fn(adapter):
        unet_params, text_encoder_params = train_text_to_image_flax.adapted_weights(adapter, frozen)
        encoder_hidden_states, pooled = code.encode_text(text_encoders, text_encoder_params, input_ids)
        added_cond_kwargs = None
        if family is SDXL:  # as SDXL_CASE: a dropped caption conditions on zeros, per-sample size conditioning
            kept = jnp.asarray(SDXL_CAPTION_KEPT)
            encoder_hidden_states = encoder_hidden_states * kept[:, None, None]
            added_cond_kwargs = code.added_conditioning(pooled * kept[:, None], jnp.asarray(SDXL_TIME_IDS, jnp.float32))
        models = dict(
            unet=unet, unet_params=unet_params, noise_scheduler=noise_scheduler, scheduler_state=scheduler_state
        )
        diffusion_loss = bound_loss(train_text_to_image_flax, models)
        return diffusion_loss(latents, encoder_hidden_states, jax.random.PRNGKey(0), config, None, added_cond_kwargs)

    queue = replay_draws(monkeypatch, recorded)
    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    assert not queue, "PyTorch drew more often than JAX"
    assert abs(float(loss) - float(recorded["loss"])) <= 1e-4, (float(loss), float(recorded["loss"]))
    grads = jax_lora.adapter_state(grads)
    assert all(np.abs(recorded[f"grad:{key}"]).max() > 0 for key in keys if key.startswith("unet.")), "grads bite"
    worst = max(float(np.abs(grads[key] - recorded[f"grad:{key}"]).max()) for key in keys)
    print(
        f"{case}: loss {float(loss):.6f} vs {float(recorded['loss']):.6f}, largest A/B gradient difference {worst:.2e}"
    )
    for key in sorted(keys):
        expected = recorded[f"grad:{key}"]
        assert np.abs(grads[key] - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max()), key


def test_every_option_changes_the_loss(torch_side):
    """The cases have teeth: Min-SNR, offset noise, input perturbation and sample weights each change the PyTorch
    loss."""

    def loss(name):
        return float(np.load(os.path.join(torch_side, f"{name}.npz"))["loss"])

    for prediction in ["epsilon", "v_prediction"]:
        plain = loss(f"t2i-{prediction}-snr_None-plain")
        assert abs(plain - loss(f"t2i-{prediction}-snr_5.0-plain")) > 1e-3
        assert abs(plain - loss(f"t2i-{prediction}-snr_None-offset")) > 1e-4
        assert (
            abs(loss(f"t2i-{prediction}-snr_None-offset") - loss(f"t2i-{prediction}-snr_None-offset_perturbed")) > 1e-4
        )
        assert abs(loss(f"ti-{prediction}-snr_None") - loss(f"ti-{prediction}-snr_5.0")) > 1e-3
        assert abs(loss(f"t2i-{prediction}-snr_5.0-plain") - loss(f"t2i-{prediction}-snr_5.0-padded_batch")) > 1e-4


def test_every_recipe_changes_the_loss(torch_side):
    """The recipe cases have teeth too: each loss type, Huber schedule, debiased estimation and timestep sampler
    changes the PyTorch loss, and the zero-terminal-SNR cases (every draw at SNR 0) stay finite."""

    def loss(name):
        return float(np.load(os.path.join(torch_side, f"{name}.npz"))["loss"])

    for prediction in ["epsilon", "v_prediction"]:
        base = f"t2i-{prediction}"
        losses = {loss_type: loss(f"{base}-{loss_type}-snr-debiased_False") for loss_type in ["l2", "huber", "l1"]}
        losses["smooth_l1"] = loss(f"{base}-smooth_l1-snr-debiased_False")
        assert len({round(value, 6) for value in losses.values()}) == 4, losses
        for loss_type in ["huber", "smooth_l1"]:
            schedules = {loss(f"{base}-{loss_type}-{schedule}-debiased_False") for schedule in ["constant", "snr"]}
            schedules.add(loss(f"{base}-{loss_type}-exponential-debiased_False"))
            assert len({round(value, 6) for value in schedules}) == 3
        assert abs(loss(f"{base}-l2-snr-debiased_True") - losses["l2"]) > 1e-4
        uniform = loss(f"t2i-{prediction}-snr_5.0-plain")
        assert abs(uniform - losses["l2"]) < 1e-6, "the l2 recipe case is the plain case"
        for sampler in ["logit_normal", "bias_earlier", "bias_later", "bias_range"]:
            assert abs(loss(f"{base}-{sampler}") - uniform) > 1e-4, sampler
    for name in ["l2", "huber-weighted"]:
        recorded = np.load(os.path.join(torch_side, f"t2i-v_prediction-zero_snr-{name}.npz"))
        assert np.isfinite(recorded["loss"]) and recorded["loss"] > 0
        # The timestep draw (the last one) lands on the SNR-0 timestep 999 for some samples and on 998 for others.
        uniform = recorded[f"draw_{sum(k.startswith('draw_') for k in recorded.files) - 1}"]
        assert (uniform >= 0.5).any() and (uniform < 0.5).any()


@pytest.mark.parametrize("family", [SD, SDXL], ids=lambda family: family.name)
def test_long_prompts_encode_alike(torch_side, assets, sdxl_pipeline, family):
    """--max_token_length 225: the Flax twin's fast tokenizers chunk LONG_PROMPTS into the PyTorch script's ids, and
    its encode_text_chunks gives PyTorch's hidden states (and SDXL's pooled embedding of the first chunk)."""
    from parity_cases import LONG_PROMPT_TOKENS, LONG_PROMPTS

    from sdtrain.jax.long_prompts import encode_text_chunks
    from sdtrain.long_prompts import caption_token_ids

    recorded = np.load(os.path.join(torch_side, f"long_prompts-{family.name}.npz"))
    folder = assets["pipeline"] if family is SD else sdxl_pipeline
    code = family_code(family)
    input_ids = caption_token_ids(code.load_tokenizers(folder), LONG_PROMPTS, LONG_PROMPT_TOKENS)
    np.testing.assert_array_equal(input_ids, recorded["input_ids"])
    encoders = [jax_models.load_flax_text_encoder(folder, None, jnp.float32, name) for name in family.text_encoders]
    params = [encoder.params for encoder in encoders]
    hidden, pooled = encode_text_chunks(code, encoders, params, jnp.asarray(input_ids), 77)
    assert hidden.shape[1] == 231
    np.testing.assert_allclose(np.asarray(hidden), recorded["hidden"], rtol=0, atol=1e-5)
    if family is SDXL:
        np.testing.assert_allclose(np.asarray(pooled), recorded["pooled"], rtol=0, atol=1e-5)
    else:
        assert pooled is None and "pooled" not in recorded.files


@pytest.mark.parametrize("case", sorted(VALIDATION_LOSS_CASES))
def test_validation_loss_equals_pytorch(torch_side, flax_models, case):
    """The held-out validation loss (issue 32): the same weights, latents, prompts and NumPy noise give the same loss
    per image and timestep in both frameworks' validation_loss_batch, and the timesteps have teeth (losses differ)."""
    from sdtrain.jax.validation_loss import validation_loss_batch
    from sdtrain.validation_loss import loss_noise, loss_timesteps

    recorded, m = np.load(os.path.join(torch_side, f"{case}.npz")), flax_models
    encoder_hidden_states = m["text_encoder"](jnp.asarray(recorded["input_ids"]), params=m["text_encoder"].params)[0]
    latents = jnp.asarray(recorded["latents"])

    def unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        variables = {"params": m["unet_params"]}
        return m["unet"].apply(variables, noisy_latents, timesteps, encoder_hidden_states, train=False).sample

    timesteps = loss_timesteps(VALIDATION_LOSS_TIMESTEPS, m["noise_scheduler"].config.num_train_timesteps)
    per_timestep = []
    for k, timestep in enumerate(timesteps):
        noise = [loss_noise(VALIDATION_LOSS_SEED, i, k, latents.shape[1:]) for i in range(latents.shape[0])]
        scheduler = (m["noise_scheduler"], m["scheduler_state"])
        inputs = (latents, encoder_hidden_states, timestep, jnp.asarray(np.stack(noise)), VALIDATION_LOSS_CASES[case])
        per_timestep.append(np.asarray(validation_loss_batch(unet, *scheduler, *inputs)))
    per_image = np.stack(per_timestep, 1)
    assert per_image.shape == recorded["per_image"].shape == (4, VALIDATION_LOSS_TIMESTEPS)
    np.testing.assert_allclose(per_image, recorded["per_image"], rtol=1e-5, atol=0)
    assert len({round(float(value), 6) for value in recorded["per_image"].mean(0)}) == VALIDATION_LOSS_TIMESTEPS
