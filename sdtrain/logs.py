"""What a run reports as it trains: the line logged for an update, the trackers the same numbers can go to (--report_to,
checked while the arguments are parsed, before Accelerate loads), and the warmup the model card reports."""

# The trackers Accelerate logs to (accelerate.utils.LoggerType, which a test compares this with), so that --report_to
# is checked while the arguments are parsed, before Accelerate is imported.
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "trackio", "aim")
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")


# diffusers' get_scheduler gives these schedules no warmup, whatever --lr_warmup_steps says.
SCHEDULES_WITHOUT_WARMUP = ("constant", "piecewise_constant")


def add_tracker_arguments(group):
    """Where the PyTorch scripts' logs go besides the progress bar (Accelerate's trackers)."""
    group.add_argument(
        "--report_to", type=str, default="tensorboard", help="Tracker: tensorboard, wandb, comet_ml, all, or none."
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")


def tracker_hyperparameters(flag_values):
    """The flags a tracker records with the run (the plain values of vars(args)), never --hub_token: tensorboard keeps
    them under logs/, which a push to the Hub uploads."""
    return {k: v for k, v in flag_values.items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}


def format_logs(global_step, logs):
    """The progress line of an update: its step and the logs dict the trackers get, each to four significant
    digits."""
    return f"step {global_step}: " + ", ".join(f"{key}={value:.4g}" for key, value in logs.items())


def report_to_problem(report_to):
    """Why --report_to cannot be used (None when it can): Accelerate's own error names the value, not the flag."""
    if report_to in REPORT_TO_CHOICES:
        return None
    return f"--report_to {report_to}: not a tracker; use one of {', '.join(REPORT_TO_CHOICES)}"


def warmup_applied(lr_scheduler, lr_warmup_steps, optimizer):
    """The warmup updates the run really has: none on a schedule without warmup, except schedule-free AdamW's, which
    warms up inside the optimizer (its schedule is constant)."""
    if optimizer == "schedule_free_adamw" or lr_scheduler not in SCHEDULES_WITHOUT_WARMUP:
        return lr_warmup_steps
    return 0
