"""Stopping on SIGTERM/SIGUSR1 (a preempted job) or Ctrl-C (SIGINT) after a checkpoint, with an exit code that says
relaunch (a signal) or interrupted (Ctrl-C)."""

import os
import signal

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after writing a checkpoint; relaunch to continue
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: what shells report after Ctrl-C, checkpoint written or not


class StopRequest:
    """SIGTERM (what cloud spot VMs and SLURM send before a kill), SIGUSR1 (SLURM's --signal) and SIGINT (Ctrl-C) ask
    the run to stop. The handler only records the request: the loop finishes the optimizer update it is in, writes a
    checkpoint at that step and exits with stop_exit_code(). A second SIGTERM or SIGUSR1 changes nothing, so it cannot
    break the save; a second Ctrl-C is a person who does not want to wait, and ends the process at once. Ctrl-C is
    handled so only while the loop trains (stop_on_ctrl_c): before it and during the final save there is no update to
    finish, and it interrupts at once, as in any program."""

    def __init__(self):
        self.signal_name = None
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):  # Windows has no SIGUSR1
                signal.signal(getattr(signal, name), self.record)
        # A job started in the background by a shell without job control has Ctrl-C ignored; it stays ignored.
        self.ctrl_c_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    def stop_on_ctrl_c(self, enabled):
        """Ctrl-C asks for a clean stop (enabled, while the loop trains) or raises KeyboardInterrupt (Python's own)."""
        if not self.ctrl_c_ignored:
            signal.signal(signal.SIGINT, self.interrupt if enabled else signal.default_int_handler)

    def record(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def interrupt(self, signum, frame):
        if self.signal_name is not None:
            # os.write and os._exit: no traceback from wherever the save was, no cleanup that could block (a
            # DataLoader joining its workers). What was being written stays a hidden .partial, cleared at the next
            # start; every published checkpoint is untouched.
            os.write(2, b"\nSecond Ctrl-C: aborted without waiting for the checkpoint\n")
            os._exit(INTERRUPTED_EXIT_CODE)
        self.record(signum, frame)
        os.write(2, b"\nCtrl-C: stopping after this update with a checkpoint; Ctrl-C again to abort without one\n")


def stop_exit_code(stop_request):
    """130 after Ctrl-C on this process, 75 (relaunch) after any other stop."""
    return INTERRUPTED_EXIT_CODE if stop_request.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


def preemption_message(stop_request, global_step):
    received = stop_request.signal_name or "a stop signal (on another process)"
    return (
        f"{received} received: stopped after step {global_step} with checkpoint-{global_step} written; relaunch the "
        f"same command with --resume_from_checkpoint latest to continue (exit code {stop_exit_code(stop_request)})"
    )


def ignore_interrupts(worker_id=None):
    """A DataLoader's worker_init_fn: Ctrl-C reaches the terminal's whole process group, workers included; a worker
    that died of it would stop the main process ("DataLoader worker exited unexpectedly") before its checkpoint. The
    main process ends its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
