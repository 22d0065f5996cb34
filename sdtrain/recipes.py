"""The training-recipe flags shared by the four scripts (noise, timesteps, loss, weighting), their checks, and the
timestep weights of --timestep_bias_strategy."""

import dataclasses

import numpy as np

from sdtrain.cli import UserError


def add_recipe_arguments(parser):
    """The loss and timestep-sampling recipes, the same flags in all four scripts (docs/recipes.md)."""
    parser.add_argument(
        "--rescale_betas_zero_snr",
        action="store_true",
        help="Rescale the noise schedule to zero terminal SNR (Lin et al. 2023); needs v-prediction.",
    )
    parser.add_argument(
        "--loss_type",
        type=str,
        default="l2",
        choices=["l2", "huber", "smooth_l1", "l1"],
        help="Distance between prediction and target: l2 (MSE), pseudo-Huber, smooth L1 or L1.",
    )
    parser.add_argument(
        "--huber_schedule",
        type=str,
        default="snr",
        choices=["constant", "exponential", "snr"],
        help="How the Huber threshold c falls from 1 at low noise to --huber_c at high noise (constant: always c).",
    )
    parser.add_argument("--huber_c", type=float, default=0.1, help="The Huber threshold c (huber and smooth_l1).")
    parser.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="Weight each timestep by 1/sqrt(SNR) in epsilon terms (Yu et al. 2024); composes with --snr_gamma.",
    )
    parser.add_argument(
        "--timestep_sampling",
        type=str,
        default="uniform",
        choices=["uniform", "logit_normal"],
        help="How training timesteps are drawn: uniformly, or logit-normal as SD3 trains.",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal timestep draw.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit-normal draw.")
    parser.add_argument(
        "--timestep_bias_strategy",
        type=str,
        default="none",
        choices=["none", "earlier", "later", "range"],
        help="Draw the earlier (less noisy), later (noisier) or a range of timesteps more often.",
    )
    parser.add_argument(
        "--timestep_bias_multiplier",
        type=float,
        default=1.0,
        help="How many times as often the favoured timesteps are drawn (below 1: less often).",
    )
    parser.add_argument(
        "--timestep_bias_begin", type=int, default=0, help="First favoured timestep of the 'range' strategy."
    )
    parser.add_argument(
        "--timestep_bias_end", type=int, default=1000, help="One past the last favoured timestep of 'range'."
    )
    parser.add_argument(
        "--timestep_bias_portion",
        type=float,
        default=0.25,
        help="Share of the timesteps favoured by 'earlier' and 'later'.",
    )


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The recipe flags (add_recipe_arguments), built once from the parsed arguments."""

    rescale_betas_zero_snr: bool
    loss_type: str
    huber_schedule: str
    huber_c: float
    debiased_estimation_loss: bool
    timestep_sampling: str
    logit_mean: float
    logit_std: float
    timestep_bias_strategy: str
    timestep_bias_multiplier: float
    timestep_bias_begin: int
    timestep_bias_end: int
    timestep_bias_portion: float

    @classmethod
    def from_args(cls, args):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def check_recipe_arguments(parser, config):
    """The recipe flags' values (a RecipeConfig) make sense together; parser.error names the flag otherwise."""
    if config.huber_c <= 0 or (config.huber_schedule != "constant" and config.huber_c > 1):
        parser.error(f"--huber_c must be in (0, 1] (above 0 with --huber_schedule constant), got {config.huber_c}")
    if config.logit_std <= 0:
        parser.error(f"--logit_std must be positive, got {config.logit_std}")
    if config.timestep_bias_multiplier <= 0:
        parser.error(f"--timestep_bias_multiplier must be positive, got {config.timestep_bias_multiplier}")
    if not 0 < config.timestep_bias_portion < 1:
        parser.error(f"--timestep_bias_portion must be in (0, 1), got {config.timestep_bias_portion}")
    if not 0 <= config.timestep_bias_begin < config.timestep_bias_end:
        parser.error(
            f"--timestep_bias_begin {config.timestep_bias_begin} and --timestep_bias_end {config.timestep_bias_end}: "
            "need 0 <= begin < end"
        )
    if config.timestep_sampling != "uniform" and config.timestep_bias_strategy != "none":
        parser.error(
            "--timestep_sampling logit_normal and --timestep_bias_strategy both choose the timesteps: pick one"
        )


def recipe_fields(config, prediction_type, num_train_timesteps):
    """The LossConfig fields of the recipe flags (a RecipeConfig), once the prediction type and the schedule length
    are known."""
    if prediction_type not in ("epsilon", "v_prediction"):
        # The loss has a target for these two only: any other (a scheduler saved with "sample") fails at step 1.
        raise UserError(
            f"the pipeline's scheduler config has prediction_type {prediction_type!r}, which these scripts do not "
            "train: pass --prediction_type epsilon or v_prediction"
        )
    if config.rescale_betas_zero_snr and prediction_type != "v_prediction":
        # At zero terminal SNR the last timestep's input is pure noise, so predicting that noise teaches nothing.
        raise UserError(
            f"--rescale_betas_zero_snr needs v-prediction, and this run predicts {prediction_type}: add "
            "--prediction_type v_prediction"
        )
    if config.timestep_bias_strategy == "range" and config.timestep_bias_begin >= num_train_timesteps:
        raise UserError(
            f"--timestep_bias_begin {config.timestep_bias_begin} is past the schedule's {num_train_timesteps} timesteps"
        )
    return dict(
        loss_type=config.loss_type,
        huber_schedule=config.huber_schedule,
        huber_c=config.huber_c,
        debiased_estimation=config.debiased_estimation_loss,
        timestep_sampling=config.timestep_sampling,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        timestep_bias_strategy=config.timestep_bias_strategy,
        timestep_bias_multiplier=config.timestep_bias_multiplier,
        timestep_bias_begin=config.timestep_bias_begin,
        timestep_bias_end=config.timestep_bias_end,
        timestep_bias_portion=config.timestep_bias_portion,
    )


def timestep_bias_weights(num_train_timesteps, config):
    """Relative weight of drawing each timestep under --timestep_bias_strategy: timesteps in the favoured span weigh
    config.timestep_bias_multiplier, the others 1. NumPy, so the PyTorch and JAX twins draw from the same table."""
    weights = np.ones(num_train_timesteps, np.float64)
    favoured = round(config.timestep_bias_portion * num_train_timesteps)
    if config.timestep_bias_strategy == "earlier":
        span = slice(0, favoured)
    elif config.timestep_bias_strategy == "later":
        span = slice(num_train_timesteps - favoured, num_train_timesteps)
    elif config.timestep_bias_strategy == "range":
        span = slice(config.timestep_bias_begin, min(config.timestep_bias_end, num_train_timesteps))
    else:
        raise ValueError(f"unknown timestep bias strategy {config.timestep_bias_strategy!r}")
    weights[span] *= config.timestep_bias_multiplier
    return weights
