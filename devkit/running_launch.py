"""A training launch left running while a test watches its output and signals it."""

import os
import re
import signal
import socket
import subprocess
import threading
import time
import types


def free_port():
    """A port nothing listens on now: the suites run in parallel (pytest -n), so fixed rendezvous or coordinator ports
    would clash."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


class RunningLaunch:
    """A launch left running, in a process group of its own (as SLURM and systemd see a job), with its output read as
    it comes: wait for a line, then signal the whole group as a scheduler or a spot-VM shutdown does."""

    def __init__(self, command, env, cwd=None):
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.chunks = []
        self.reader = threading.Thread(target=self.read)
        self.reader.start()

    def read(self):
        for line in iter(self.process.stdout.readline, ""):
            self.chunks.append(line)

    def wait_for(self, pattern, timeout=600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, "".join(self.chunks)):
                return
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} never appeared:\n{''.join(self.chunks)[-4000:]}")

    def send(self, sig=signal.SIGTERM):
        os.killpg(self.process.pid, sig)

    def finish(self, timeout=600):
        """Wait until every process of the launch is done (their shared output closes): the returncode and output."""
        self.reader.join(timeout)
        self.process.wait(timeout)
        return types.SimpleNamespace(returncode=self.process.returncode, output="".join(self.chunks))
