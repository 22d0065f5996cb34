"""The PyTorch/JAX parity cases: every option of the loss, for both script pairs. Read by both halves of the test
(torch_side.py in the PyTorch environment, test_parity.py in the JAX one)."""

import itertools

import numpy as np

from sdtrain.batching import sdxl_time_ids

# name -> LossConfig fields (the same fields in all four scripts' LossConfig), the sample_weights argument if any, and
# "zero_snr": the noise schedule rescaled to zero terminal SNR (--rescale_betas_zero_snr).
TEXT_TO_IMAGE = {
    f"t2i-{prediction}-snr_{snr}-{extra}": {"prediction_type": prediction, "snr_gamma": snr, **extra_fields}
    for prediction, snr, (extra, extra_fields) in itertools.product(
        ["epsilon", "v_prediction"],
        [None, 5.0],
        [
            ("plain", {}),
            ("offset", {"noise_offset": 0.1}),
            ("offset_perturbed", {"noise_offset": 0.1, "input_perturbation": 0.1}),
        ],
    )
}
# A bucket's padded last batch (see bucket_batches): three real examples weighing 4/3 and one padding example at 0.
PADDED_BATCH = {"sample_weights": [4 / 3, 4 / 3, 4 / 3, 0.0]}
TEXT_TO_IMAGE.update(
    {
        f"t2i-{prediction}-snr_5.0-padded_batch": {"prediction_type": prediction, "snr_gamma": 5.0, **PADDED_BATCH}
        for prediction in ["epsilon", "v_prediction"]
    }
)
# The recipes: every loss type x Huber schedule x debiased on/off x prediction type, with Min-SNR on (they compose).
TEXT_TO_IMAGE.update(
    {
        f"t2i-{prediction}-{loss_type}-{schedule}-debiased_{debiased}": {
            "prediction_type": prediction,
            "snr_gamma": 5.0,
            "loss_type": loss_type,
            "huber_schedule": schedule,
            "huber_c": 0.1,
            "debiased_estimation": debiased,
        }
        for prediction, loss_type, schedule, debiased in itertools.product(
            ["epsilon", "v_prediction"],
            ["l2", "huber", "smooth_l1", "l1"],
            ["constant", "exponential", "snr"],
            [False, True],
        )
    }
)
# Timestep sampling: logit-normal, and each bias strategy (a strong multiplier, so the draws visibly move).
SAMPLING = {
    "logit_normal": {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.5},
    "bias_earlier": {"timestep_bias_strategy": "earlier", "timestep_bias_multiplier": 20.0},
    "bias_later": {"timestep_bias_strategy": "later", "timestep_bias_multiplier": 20.0, "timestep_bias_portion": 0.1},
    "bias_range": {
        "timestep_bias_strategy": "range",
        "timestep_bias_multiplier": 50.0,
        "timestep_bias_begin": 200,
        "timestep_bias_end": 300,
    },
}
TEXT_TO_IMAGE.update(
    {
        f"t2i-{prediction}-{name}": {"prediction_type": prediction, "snr_gamma": 5.0, **fields}
        for prediction in ["epsilon", "v_prediction"]
        for name, fields in SAMPLING.items()
    }
)
# Zero terminal SNR (each side rescales its own schedule), every draw at one of the last two timesteps (the last has
# SNR 0): Min-SNR, debiased estimation and the SNR-scheduled Huber threshold must all stay finite there.
TERMINAL = {"timestep_bias_strategy": "range", "timestep_bias_multiplier": 1e9, "timestep_bias_begin": 998}
TEXT_TO_IMAGE.update(
    {
        "t2i-v_prediction-zero_snr-l2": {"prediction_type": "v_prediction", "zero_snr": True, **TERMINAL},
        "t2i-v_prediction-zero_snr-huber-weighted": {
            "prediction_type": "v_prediction",
            "zero_snr": True,
            "snr_gamma": 5.0,
            "debiased_estimation": True,
            "loss_type": "huber",
            **TERMINAL,
        },
    }
)
# --masked_loss: a latent-grid mask per sample, (4, 1, 8, 8) as the latents: all ones, all zeros (a sample that weighs
# 0), a grey ramp and the left half (the prompt that holds the placeholder, so the gradient still reaches its rows),
# with Min-SNR and the pseudo-Huber loss on top (they compose).
MASKS = np.stack(
    [np.ones((8, 8)), np.zeros((8, 8)), np.tile(np.linspace(0, 1, 8), (8, 1)), np.tile(np.arange(8) < 4, (8, 1))]
)[:, None].astype(np.float32)
TEXT_TO_IMAGE["t2i-v_prediction-huber-snr_5.0-masked"] = {
    "prediction_type": "v_prediction",
    "snr_gamma": 5.0,
    "loss_type": "huber",
    "mask": MASKS,
}
TEXTUAL_INVERSION = {
    f"ti-{prediction}-snr_{snr}": {"prediction_type": prediction, "snr_gamma": snr}
    for prediction, snr in itertools.product(["epsilon", "v_prediction"], [None, 5.0])
}
TEXTUAL_INVERSION["ti-v_prediction-huber-debiased-logit_normal"] = {
    "prediction_type": "v_prediction",
    "snr_gamma": 5.0,
    "loss_type": "huber",
    "debiased_estimation": True,
    **SAMPLING["logit_normal"],
}
TEXTUAL_INVERSION["ti-epsilon-snr_5.0-masked"] = {"prediction_type": "epsilon", "snr_gamma": 5.0, "mask": MASKS}
CASES = {**TEXT_TO_IMAGE, **TEXTUAL_INVERSION}
# SDXL textual inversion (a tiny SDXL pipeline): both encoders' new rows, the pooled embedding, the size conditioning.
SDXL_TEXTUAL_INVERSION = {
    "ti_sdxl-epsilon-snr_None": {"prediction_type": "epsilon", "snr_gamma": None},
    "ti_sdxl-v_prediction-snr_5.0": {"prediction_type": "v_prediction", "snr_gamma": 5.0},
}
# One example each: landscape, its mirror (an odd margin: the mirror's left offset is one pixel larger), portrait
# (all center-cropped), and a square squeezed without a crop.
SDXL_TI_TIME_IDS = [
    sdxl_time_ids(width, height, 64, center_crop, flipped)
    for width, height, center_crop, flipped in [(97, 72, True, False), (97, 72, True, True), (72, 120, True, False)]
    + [(80, 80, False, False)]
]
PROMPTS = ["a red circle", "a blue square", "a photo of a green circle", "a <blob> on a yellow square"]
# SDXL (the tiny SDXL pipeline): both text encoders' conditioning, the third caption dropped (zeros), and size
# conditioning that differs per sample, into the UNet's added embedding.
SDXL_CASE = ("sdxl-epsilon-snr_5.0", {"prediction_type": "epsilon", "snr_gamma": 5.0})
SDXL_CAPTION_KEPT = [1.0, 1.0, 0.0, 1.0]
SDXL_TIME_IDS = [[64, 64, 0, 0, 64, 64], [50, 100, 0, 32, 64, 64], [100, 50, 12, 0, 64, 64], [96, 80, 3, 7, 64, 64]]
PLACEHOLDER, INITIALIZER, NUM_VECTORS = "<blob>", "circle", 2
# LoRA (--rank with --train_text_encoder): the adapter on every UNet module a LoRA may adapt and on the text
# encoders' attention, A and B drawn from a seed (B nonzero, so the gradient reaches A): the loss and every A/B
# gradient. The SDXL case conditions as SDXL_CASE does.
LORA_RANK, LORA_ALPHA = 4, 8.0
LORA_CASES = {
    "lora-sd-v_prediction-snr_5.0": {"prediction_type": "v_prediction", "snr_gamma": 5.0},
    "lora_sdxl-epsilon-snr_5.0": {"prediction_type": "epsilon", "snr_gamma": 5.0},
}
# --max_token_length 225 (issue 32): a short caption (padded with empty chunks) and one of 200 tokens in three
# chunks, through each family's text encoders, chunk by chunk (sdtrain/torch|jax/long_prompts.py).
LONG_PROMPT_TOKENS = 225
LONG_PROMPTS = [
    PROMPTS[0],
    " ".join(["a", "red", "circle", "on", "a", "blue", "square"] * 28 + ["a", "toy", "cat", "!"]),
]

# The held-out validation loss (sdtrain.validation_loss, issue 32): each framework's validation_loss_batch on the same
# weights, latents and prompts, with the NumPy noise of loss_noise(seed, image, k) at the equidistant timesteps; every
# per-image, per-timestep loss within 1e-5 relative.
VALIDATION_LOSS_CASES = {f"validation_loss-{prediction}": prediction for prediction in ["epsilon", "v_prediction"]}
VALIDATION_LOSS_SEED, VALIDATION_LOSS_TIMESTEPS = 11, 4
