"""Flag values that parse but would fail, or silently train nothing, later in a run: found at the end of parse_args
(each function returns the message for parser.error, or None). Framework-free."""


def validation_problem(prompt_flag, prompts, validation_resolution):
    """--validation_resolution without validation prompts renders nothing: most likely the prompts were forgotten."""
    if validation_resolution is not None and not prompts:
        return f"--validation_resolution {validation_resolution} sizes the validation images: add {prompt_flag}"
    return None


def training_problem(learning_rate, lr_warmup_steps, max_grad_norm, num_train_epochs, max_train_steps, snr_gamma):
    """The training length, step size and loss weighting: a run that would train nothing, or in the wrong direction."""
    if learning_rate <= 0:
        return f"--learning_rate must be positive, got {learning_rate}"
    if lr_warmup_steps < 0:
        return f"--lr_warmup_steps must be 0 or more, got {lr_warmup_steps}"
    if max_grad_norm < 0:
        # A negative clip norm gives a negative clipping coefficient: every clipped gradient would be reversed.
        return f"--max_grad_norm must be 0 (no clipping) or positive, got {max_grad_norm}"
    if max_train_steps is None and num_train_epochs < 1:
        return f"--num_train_epochs must be at least 1 (or give --max_train_steps), got {num_train_epochs}"
    if snr_gamma is not None and snr_gamma <= 0:
        # Min-SNR weights are min(SNR, gamma) / SNR: zero or negative for every timestep.
        return f"--snr_gamma must be positive (5.0 is recommended), got {snr_gamma}"
    return None
