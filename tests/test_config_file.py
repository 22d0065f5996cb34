"""--config (a TOML or YAML file of settings) and --validation_prompts_file, parsed in-process as the PyTorch scripts
parse them: a file is the same flags on the command line, the command line wins, a mistake in the file is refused by
parse_args (before any model loads) naming the key, and the config.toml a run writes repeats it. That launched runs
write it: tests/test_lora.py (PyTorch) and tests_flax/test_flax_scripts.py (Flax)."""

import os

import pytest
from conftest import REPO

import textual_inversion
import train_text_to_image
from devkit.command_line import command_line, run_as_main
from sdtrain.cli import WriteFailure
from sdtrain.config_file import RUN_CONFIG, write_config

T2I_REQUIRED = "--pretrained_model_name_or_path p --train_data_dir d"
TI_REQUIRED = T2I_REQUIRED + " --placeholder_token <t> --initializer_token toy"
# The same settings as flags and as a file: a float, an int, a choice, a store_true flag and a list.
T2I_FLAGS = "--learning_rate 2e-5 --max_train_steps 3 --lr_scheduler cosine --use_ema --validation_prompts 'a red' 'b'"
T2I_TOML = """
pretrained_model_name_or_path = "p"
train_data_dir = "d"
learning_rate = 2e-5
max_train_steps = 3
lr_scheduler = "cosine"
use_ema = true
validation_prompts = ["a red", "b"]
"""


def settings(args):
    """What a run is told, bar where it was read from (and flag_values, what write_config writes, checked apart)."""
    return {name: value for name, value in vars(args).items() if name not in ("config", "flag_values")}


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return str(path)


def refused(parse_args, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_config_file_is_its_flags_on_the_command_line_and_the_command_line_wins(tmp_path):
    toml = write(tmp_path, "run.toml", T2I_TOML)
    from_file = train_text_to_image.parse_args(["--config", toml])
    assert from_file.config == toml
    assert settings(from_file) == settings(train_text_to_image.parse_args(command_line(T2I_REQUIRED, T2I_FLAGS)))
    wins = train_text_to_image.parse_args(command_line("--config", toml, "--max_train_steps 9 --validation_prompts x"))
    assert (wins.max_train_steps, wins.validation_prompts, wins.learning_rate) == (9, ["x"], 2e-5)
    # YAML, with a key in the dashed form and 2e-5 as YAML 1.1 reads it (a string: no dot), converted as the flag would.
    yaml = write(tmp_path, "run.yaml", T2I_TOML.replace(" = ", ": ").replace("learning_rate", "learning-rate"))
    assert settings(train_text_to_image.parse_args(["--config", yaml])) == settings(from_file)
    # A bare `no` in YAML 1.1 is a boolean: for a flag whose choices hold "no", it is that choice.
    precision = write(tmp_path, "no.yaml", T2I_TOML.replace(" = ", ": ") + "mixed_precision: no\n")
    assert train_text_to_image.parse_args(["--config", precision]).mixed_precision == "no"
    # Textual inversion's required flags from the file too.
    ti = T2I_TOML.split("learning_rate")[0] + 'placeholder_token = "<t>"\ninitializer_token = "toy"\n'
    ti = write(tmp_path, "ti.toml", ti + "\nnum_vectors = 2\nscale_lr = true\n")
    expected = textual_inversion.parse_args(command_line(TI_REQUIRED, "--num_vectors 2 --scale_lr"))
    assert settings(textual_inversion.parse_args(["--config", ti])) == settings(expected)


@pytest.mark.parametrize(
    "text,message",
    [
        ("learnig_rate = 1e-5", "unknown key 'learnig_rate' (did you mean learning_rate?)"),
        ("max_train_steps = 'three'", "max_train_steps = 'three': expected an int"),
        ("max_train_steps = 3.5", "max_train_steps = 3.5: expected an int"),
        ("use_ema = 'yes'", "use_ema = 'yes': expected true or false"),
        ("lr_scheduler = 'cosin'", "lr_scheduler = 'cosin': expected one of constant, constant_with_warmup"),
        ("learning_rate = [1e-5, 1e-4]", "learning_rate = [1e-05, 0.0001]: expected one value, not a list"),
        ("learning_rate = ", "cannot be read: Invalid value"),
        ("config = 'other.toml'", "a config file cannot name another (key 'config')"),
    ],
)
def test_a_mistake_in_the_file_is_refused_at_parse_time_naming_the_key(tmp_path, capsys, text, message):
    path = write(tmp_path, "run.toml", 'pretrained_model_name_or_path = "p"\ntrain_data_dir = "d"\n' + text)
    error = refused(train_text_to_image.parse_args, ["--config", path], capsys)
    assert error.startswith(f"error: --config {path}") and message in error, error


def test_an_unknown_key_is_refused_before_any_framework_loads(tmp_path):
    path = write(tmp_path, "run.toml", 'pretrained_model_name_or_path = "p"\ntrain_data_dir = "d"\nlearnin_rate = 1\n')
    result = run_as_main("train_text_to_image.py", "--config", path, cwd=REPO)
    assert result.stdout.splitlines()[-1] == "imported: [] exit: 2"
    assert result.stderr.splitlines() == [
        f"error: --config {path}: unknown key 'learnin_rate' (did you mean learning_rate?); see train_text_to_image.py "
        "--help"
    ]


def test_the_readme_example_parses(tmp_path):
    example = open(os.path.join(REPO, "README.md")).read().split("```toml\n", 1)[1].split("```", 1)[0]
    args = train_text_to_image.parse_args(["--config", write(tmp_path, "run.toml", example)])
    assert args.use_ema and args.validation_prompts == ["yoda", "a cute naruto creature"]


def test_a_config_file_that_cannot_be_read_is_named(tmp_path, capsys):
    missing = str(tmp_path / "nowhere.toml")
    assert f"--config {missing}: No such file or directory" in refused(
        textual_inversion.parse_args, ["--config", missing], capsys
    )
    json = write(tmp_path, "run.json", "{}")
    assert f"--config {json}: not a .toml, .yaml or .yml file" in refused(
        textual_inversion.parse_args, ["--config", json], capsys
    )


def test_the_config_a_run_writes_repeats_it(tmp_path):
    """None is left out (TOML has none) and reads back as the default; the token is never written (the folder may go
    to the Hub); the seed is the one the run used, drawn when no --seed was given."""
    flags = "--center_crop --validation_resolution 64,64 --aspect_ratio_buckets 64,64;64,96 --hub_token secret"
    original = train_text_to_image.parse_args(command_line(T2I_REQUIRED, T2I_FLAGS, flags))
    out = tmp_path / "run"
    out.mkdir()
    write_config(str(out), original, seed=11)
    assert os.listdir(out) == [RUN_CONFIG]  # renamed into place: no temporary file left
    text = (out / RUN_CONFIG).read_text()
    assert "secret" not in text and "max_train_samples" not in text
    repeated = train_text_to_image.parse_args(["--config", str(out / RUN_CONFIG)])
    assert settings(repeated) == {**settings(original), "seed": 11, "hub_token": None}
    assert repeated.flag_values == {**original.flag_values, "seed": 11}
    with pytest.raises(WriteFailure, match=f"could not write {RUN_CONFIG} into .*gone .*FileNotFoundError"):
        write_config(str(tmp_path / "gone"), original)  # one error line, not a traceback (sdtrain.cli.run)


def test_validation_prompts_file(tmp_path, capsys):
    parse = train_text_to_image.parse_args
    prompts = write(tmp_path, "prompts.txt", "a red circle\n\n  a blue square \n")
    args = parse(command_line(T2I_REQUIRED, "--validation_prompts_file", prompts))
    assert args.validation_prompts == ["a red circle", "a blue square"]
    # Either one from a config file gives way to the other on the command line.
    toml = write(tmp_path, "run.toml", T2I_TOML)
    overridden = parse(["--config", toml, "--validation_prompts_file", prompts])
    assert overridden.validation_prompts == args.validation_prompts
    # The config.toml such a run writes repeats it: the prompts given way to are not in it.
    (tmp_path / "out").mkdir()
    write_config(str(tmp_path / "out"), overridden)
    repeated = parse(["--config", str(tmp_path / "out" / RUN_CONFIG)])
    assert repeated.validation_prompts == args.validation_prompts
    with_file = write(
        tmp_path, "file.toml", T2I_TOML.replace("validation_prompts = ", f"validation_prompts_file = '{prompts}'\n#")
    )
    assert parse(["--config", with_file, "--validation_prompts", "x"]).validation_prompts == ["x"]
    assert parse(["--config", with_file]).validation_prompts == args.validation_prompts
    both = command_line(T2I_REQUIRED, "--validation_prompts x --validation_prompts_file", prompts)
    assert "--validation_prompts and --validation_prompts_file: give one or the other" in refused(parse, both, capsys)
    missing = str(tmp_path / "none.txt")
    error = refused(parse, command_line(T2I_REQUIRED, "--validation_prompts_file", missing), capsys)
    assert f"--validation_prompts_file {missing}: No such file or directory" in error
    empty = write(tmp_path, "empty.txt", "\n \n")
    error = refused(parse, command_line(T2I_REQUIRED, "--validation_prompts_file", empty), capsys)
    assert f"--validation_prompts_file {empty} holds no prompts (one a line)" in error
