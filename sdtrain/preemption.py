"""Stopping on SIGTERM/SIGINT (a preempted or cancelled job) after a checkpoint, with an exit code that says
relaunch."""

import signal

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after writing a checkpoint; relaunch to continue


class StopRequest:
    """SIGTERM (what cloud spot VMs and SLURM send before a kill) and SIGUSR1 (SLURM's --signal) ask the run to stop.
    The handler only records the request: the loop finishes the optimizer update it is in, writes a checkpoint at
    that step and exits with PREEMPTED_EXIT_CODE. A second signal changes nothing, so it cannot break the save."""

    def __init__(self):
        self.signal_name = None
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):  # Windows has no SIGUSR1
                signal.signal(getattr(signal, name), self.record)

    def record(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name


def preemption_message(stop_request, global_step):
    received = stop_request.signal_name or "a stop signal (on another process)"
    return (
        f"{received} received: stopped after step {global_step} with checkpoint-{global_step} written; relaunch the "
        f"same command with --resume_from_checkpoint latest to continue (exit code {PREEMPTED_EXIT_CODE})"
    )
