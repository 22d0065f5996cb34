"""The PyTorch/JAX parity cases: every option of the loss, for both script pairs. Read by both halves of the test
(torch_side.py in the PyTorch environment, test_parity.py in the JAX one)."""

import itertools

# name -> LossConfig fields (the same fields in all four scripts' LossConfig), and the sample_weights argument if any.
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
TEXTUAL_INVERSION = {
    f"ti-{prediction}-snr_{snr}": {"prediction_type": prediction, "snr_gamma": snr}
    for prediction, snr in itertools.product(["epsilon", "v_prediction"], [None, 5.0])
}
CASES = {**TEXT_TO_IMAGE, **TEXTUAL_INVERSION}
PROMPTS = ["a red circle", "a blue square", "a photo of a green circle", "a <blob> on a yellow square"]
PLACEHOLDER, INITIALIZER, NUM_VECTORS = "<blob>", "circle", 2
