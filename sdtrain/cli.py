"""The command line of the four scripts: an argument parser whose mistakes are one line, and the run of main() that
reports a user's mistake (a bad flag, path, data set or model) as one `error: ...` line and a non-zero exit instead of
a Python traceback. --debug, or SDTRAIN_DEBUG=1 in the environment, shows the traceback as well. Framework-free: the
scripts parse and check their arguments with it before torch, JAX or diffusers load, so --help answers at once."""

import argparse
import difflib
import os
import sys

from sdtrain.preemption import INTERRUPTED_EXIT_CODE

ARGUMENT_ERROR_EXIT_CODE = 2  # what argparse has always exited with on a bad flag
USER_ERROR_EXIT_CODE = 1  # any other mistake a user can fix: a path, a data set, a model, a flag combination
DEBUG_VARIABLE = "SDTRAIN_DEBUG"


class UserError(ValueError):
    """A problem the user causes and can fix, with a message that names the culprit (flag, path, column, token,
    step) and what to do. run() prints it as one line; anything else is a bug and keeps its traceback. A ValueError,
    so code that caught the ValueErrors these messages used to be still catches them."""


class WriteFailure(OSError):
    """A file the run could not write (a full disk, a lost mount, a permission), with a message that says what, where
    and how much room is left (run_folder.write_failure). The machine's state, not a bug: run() prints it as one line
    too. An OSError, as the failure it reports."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with every default shown in --help, and a mistake reported in one line (not the usage of a hundred
    flags), with the closest flag when one was mistyped."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        hints = []
        if "unrecognized arguments" in message:
            flags = [option for option in self._option_string_actions if option.startswith("--")]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.75)
                if word.startswith("-") and close:
                    hints.append(close[0])
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        self.exit(ARGUMENT_ERROR_EXIT_CODE, f"error: {message}{hint}; see {self.prog} --help\n")


def add_debug_argument(group):
    group.add_argument(
        "--debug",
        action="store_true",
        help=f"On an error, show the Python traceback too (also: {DEBUG_VARIABLE}=1 in the environment).",
    )


def debugging(debug=False):
    """Whether an error shows its traceback: --debug (`debug`), or DEBUG_VARIABLE set in the environment."""
    return debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run(main, debug=False):
    """main(): the script's main with its parsed arguments bound (functools.partial(main, args)); `debug`: --debug.
    A UserError becomes one `error: ...` line on stderr and exit code USER_ERROR_EXIT_CODE (under accelerate launch,
    the launcher's own CalledProcessError follows unless it is launched with -q). So does a FloatingPointError: the
    finite checks raise it when training diverged, which the learning rate fixes, not a bug; and a WriteFailure."""
    try:
        return main()
    except (UserError, FloatingPointError, WriteFailure) as err:
        if debugging(debug):
            raise
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:  # Ctrl-C while no update was in progress (see preemption.StopRequest): no traceback
        if debugging(debug):
            raise
        sys.stderr.write("\nCtrl-C: interrupted; the checkpoints already written are kept\n")
        sys.stderr.flush()
        sys.exit(INTERRUPTED_EXIT_CODE)
