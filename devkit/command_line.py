"""Command lines for launching the scripts from tests and tools, written as on a shell."""

import shlex


def command_line(*parts):
    """A script's arguments. A part that starts with '--' is a piece of command line, split as a shell splits it
    ("--seed 7 --validation_prompts 'a red circle'"); any other part (a path, a number) is one argument."""
    arguments = []
    for part in parts:
        arguments += shlex.split(part) if isinstance(part, str) and part.startswith("--") else [str(part)]
    return arguments


def without_seed(arguments):
    """The arguments with --seed and its value taken out: a run that draws its own seed."""
    position = arguments.index("--seed")
    return arguments[:position] + arguments[position + 2 :]


def recorded_seed(checkpoint):
    """The seed a checkpoint recorded (the one its run drew when started without --seed)."""
    import json
    import os

    with open(os.path.join(checkpoint, "checkpoint_metadata.json")) as f:
        return json.load(f)["seed"]


# The libraries a script must not have imported when it answers --help or a bad flag.
FRAMEWORKS = ["torch", "diffusers", "transformers", "accelerate", "datasets", "jax", "flax", "optax"]


def run_as_main(script, *argv, cwd, env=None):
    """`python script argv...` in this interpreter, inside a probe that prints, on the last line of stdout once the
    script exits, which FRAMEWORKS it had imported by then and its exit code: 'imported: [...] exit: N'."""
    import os
    import subprocess
    import sys

    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, *{list(argv)!r}]\n"
        "code = 0\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"print('imported:', sorted(name for name in {FRAMEWORKS!r} if name in sys.modules), 'exit:', code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )


def mistyped_flag_case(script):
    """Arguments with every required flag and one mistyped flag, and the one line the script must answer with."""
    required = ["--pretrained_model_name_or_path", "x", "--train_data_dir", "x", "--output_dir", "x"]
    if script.startswith("textual_inversion"):
        required += ["--placeholder_token", "<x>", "--initializer_token", "x"]
    expected = (
        f"error: unrecognized arguments: --lerning_rate 1e-4 (did you mean --learning_rate?); see {script} --help"
    )
    return [*required, "--lerning_rate", "1e-4"], expected
