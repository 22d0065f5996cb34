"""Settings from a file: `--config run.toml` (or .yaml / .yml) whose keys are the flags' names, the command line
winning over it; and the config.toml every run writes into its output folder, so that `--config
<output_dir>/config.toml` repeats the run. Also --validation_prompts_file, one prompt a line. Framework-free: the
files are read while the arguments are parsed, before any model loads."""

import difflib
import os
import sys

import tomli_w
import tomllib
import yaml

from sdtrain.cli import WriteFailure
from sdtrain.run_folder import flush_file, fsync_folder, write_failure

RUN_CONFIG = "config.toml"  # what every run writes into its output folder


# Flags never written into config.toml: the file itself, a secret (the folder may be pushed to the Hub), and each
# process's own rank, which the launcher gives every process (written from process 0, it would be wrong elsewhere).
NOT_WRITTEN = ("help", "config", "hub_token", "local_rank", "process_id")


def add_config_argument(parser):
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="A .toml or .yaml file of settings, flag names as keys (learning_rate = 1e-5; a list for several "
        f"values); flags on the command line win. Every run writes its own as {RUN_CONFIG} in --output_dir.",
    )


def add_prompt_arguments(group):
    """--validation_prompts, and --validation_prompts_file for many (parse_with_config reads it)."""
    group.add_argument(
        "--validation_prompts",
        type=str,
        default=None,
        nargs="+",
        help="Prompts rendered every --validation_epochs and at the end.",
    )
    group.add_argument(
        "--validation_prompts_file",
        type=str,
        default=None,
        help="A text file of validation prompts, one a line (blank lines skipped); instead of --validation_prompts.",
    )


def parse_with_config(parser, argv=None):
    """parser.parse_args(argv) with the --config file's settings in place of the defaults, so that the command line
    wins; a mistake in the file (unknown key, wrong type, unreadable file) is a parser.error naming it. Keeps the
    flags' values as parsed in args.flag_values, for write_config: parse_args derives some from others afterwards.
    With --validation_prompts_file, its prompts become args.validation_prompts."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = last_value(argv, "--config")
    from_file = read_settings(parser, path) if path is not None else {}
    actions = flag_actions(parser)
    for dest in from_file:
        actions[dest].required = False  # given by the file
    parser.set_defaults(**from_file)
    args = parser.parse_args(argv)
    if args.config != path:
        parser.error(f"--config: write the flag in full (got {args.config})")
    args.flag_values = {dest: getattr(args, dest) for dest in actions if dest not in NOT_WRITTEN}
    if "validation_prompts_file" in actions:
        given = {dest for dest in actions if any(given_in(argv, option) for option in actions[dest].option_strings)}
        read_prompts_file(parser, args, set(from_file) - given)
    return args


def given_in(argv, option):
    return any(word == option or word.startswith(option + "=") for word in argv)


def last_value(argv, option):
    """The value argv gives `option` last (`--option value` or `--option=value`), or None."""
    value = None
    for index, word in enumerate(argv):
        if word == "--":
            break
        if word == option and index + 1 < len(argv):
            value = argv[index + 1]
        elif word.startswith(option + "="):
            value = word.split("=", 1)[1]
    return value


def flag_actions(parser):
    """{dest: action} for every flag of the parser."""
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def read_settings(parser, path):
    """The settings of the file at `path` as {dest: value}, each checked and converted as its flag would be."""
    try:
        with open(path, "rb") as f:
            if path.endswith(".toml"):
                data = tomllib.load(f)
            elif path.endswith((".yaml", ".yml")):
                data = yaml.safe_load(f) or {}
            else:
                parser.error(f"--config {path}: not a .toml, .yaml or .yml file")
    except OSError as err:
        parser.error(f"--config {path}: {err.strerror or err}")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        parser.error(f"--config {path} cannot be read: {' '.join(str(err).split())}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected flag names and their values, found a {type(data).__name__}")
    actions = flag_actions(parser)
    settings = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest == "config":
            parser.error(f"--config {path}: a config file cannot name another (key '{key}')")
        if dest not in actions:
            close = difflib.get_close_matches(dest, [name for name in actions if name != "config"], n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"see {parser.prog} --help for the flags"
            parser.error(f"--config {path}: unknown key '{key}' ({hint})")
        if dest in settings:
            parser.error(f"--config {path}: '{key}' is given twice")
        if value is None:  # YAML's empty value: the flag's default
            continue
        try:
            settings[dest] = flag_value(actions[dest], value)
        except ValueError as err:
            parser.error(f"--config {path}: {key} = {value!r}: {err}")
    return settings


def flag_value(action, value):
    """`value` as the flag's own parsing would give it: its type, its choices, one value or a list; a ValueError
    saying what the flag expects otherwise."""
    if action.nargs == 0:  # store_true and its kind: the value is the setting itself
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    several = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if isinstance(value, list) != several:
        if not several:
            raise ValueError("expected one value, not a list")
        value = [value]
    if several and action.nargs == "+" and not value:
        raise ValueError("expected at least one value")
    convert = action.type or str
    converted = []
    for item in value if several else [value]:
        if isinstance(item, bool) and action.choices is not None and {"no", "yes"} & set(action.choices):
            # YAML 1.1 reads a bare no / yes as a boolean: `mixed_precision: no` means the choice "no".
            item = "yes" if item else "no"
        if isinstance(item, (bool, dict, list)):
            raise ValueError(f"expected {'a ' + convert.__name__ if convert is not str else 'text'}")
        try:
            item = convert(str(item))
        except (TypeError, ValueError):
            raise ValueError(f"expected {'an' if convert is int else 'a'} {convert.__name__}") from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if several else converted[0]


def read_prompts_file(parser, args, from_file_only):
    """--validation_prompts_file's prompts into args.validation_prompts. Given with --validation_prompts, it is an
    error, unless one of the two came from the config file only and the other from the command line, which wins."""
    path, flags = args.validation_prompts_file, ("validation_prompts", "validation_prompts_file")
    if path is not None and args.validation_prompts is not None:
        overridden = [flag for flag in flags if flag in from_file_only]
        if len(overridden) != 1:
            parser.error("--validation_prompts and --validation_prompts_file: give one or the other")
        setattr(args, overridden[0], None)
        args.flag_values.pop(overridden[0], None)  # so that config.toml repeats the run, not the conflict
        if overridden[0] == "validation_prompts_file":
            return
    if args.validation_prompts_file is None:
        return
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"--validation_prompts_file {path}: {getattr(err, 'strerror', None) or err}")
    if not prompts:
        parser.error(f"--validation_prompts_file {path} holds no prompts (one a line)")
    args.validation_prompts = prompts


def config_text(flag_values, **overrides):
    """The TOML text of a run's settings: `flag_values` (args.flag_values) with `overrides` (what the run chose
    itself, such as a drawn seed), None omitted: TOML has no null, and an absent key is the flag's default, None."""
    values = {dest: value for dest, value in {**flag_values, **overrides}.items() if value is not None}
    return "# This run's settings, by flag name. Repeat it with --config <this file>.\n" + tomli_w.dumps(values)


def write_config(output_dir, args, **overrides):
    """Write the run's settings (config_text) to output_dir/config.toml, as a whole or not at all: a temporary file
    renamed into place; a WriteFailure saying why it could not be. Main process only."""
    path = os.path.join(output_dir, RUN_CONFIG)
    temporary = os.path.join(output_dir, f".{RUN_CONFIG}.partial")  # what the next run's lock clears if left
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(config_text(args.flag_values, **overrides))
        flush_file(temporary)
        os.replace(temporary, path)
    except OSError as err:
        raise WriteFailure(write_failure(RUN_CONFIG, output_dir, err)) from err
    fsync_folder(output_dir)
