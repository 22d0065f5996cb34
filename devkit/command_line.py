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
