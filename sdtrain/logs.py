"""Log lines."""


def format_logs(global_step, logs):
    return f"step {global_step}: " + ", ".join(f"{key}={value:.4g}" for key, value in logs.items())
