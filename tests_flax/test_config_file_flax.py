"""--config and --validation_prompts_file in the Flax twins, parsed in-process as tests/test_config_file.py parses the
PyTorch scripts: a TOML file is the same flags on the command line, the command line wins, an unknown key is refused
naming the closest flag, and the config.toml a run writes repeats it (a launched run writes it:
tests_flax/test_flax_scripts.py)."""

import pytest

import textual_inversion_flax
import train_text_to_image_flax
from devkit.command_line import command_line
from sdtrain.config_file import RUN_CONFIG, write_config

T2I_REQUIRED = "--pretrained_model_name_or_path p --train_data_dir d"
TI_REQUIRED = T2I_REQUIRED + " --placeholder_token <t> --initializer_token toy"
FILE = 'pretrained_model_name_or_path = "p"\ntrain_data_dir = "d"\nlearning_rate = 2e-5\nmax_train_steps = 3\n'
FLAGS = "--learning_rate 2e-5 --max_train_steps 3"


def settings(args):
    return {name: value for name, value in vars(args).items() if name != "config"}


@pytest.mark.parametrize(
    "parse_args,required,file,flags",
    [
        (
            train_text_to_image_flax.parse_args,
            T2I_REQUIRED,
            FILE + "use_ema = true\nvalidation_prompts = ['a red', 'b']\n",
            FLAGS + " --use_ema --validation_prompts 'a red' b",
        ),
        (
            textual_inversion_flax.parse_args,
            TI_REQUIRED,
            FILE + "placeholder_token = '<t>'\ninitializer_token = 'toy'\nscale_lr = true\n",
            FLAGS + " --scale_lr",
        ),
    ],
    ids=["train_text_to_image_flax", "textual_inversion_flax"],
)
def test_a_config_file_is_its_flags_the_command_line_wins_and_the_written_one_repeats_it(
    parse_args, required, file, flags, tmp_path, capsys
):
    path = tmp_path / "run.toml"
    path.write_text(file)
    from_file = parse_args(["--config", str(path)])
    assert settings(from_file) == settings(parse_args(command_line(required, flags)))
    assert parse_args(["--config", str(path), "--max_train_steps", "9"]).max_train_steps == 9
    write_config(str(tmp_path), from_file, seed=5)
    repeated = parse_args(["--config", str(tmp_path / RUN_CONFIG)])
    assert settings(repeated) == settings(parse_args(command_line(required, flags, "--seed 5")))
    path.write_text(file + "max_train_step = 4\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert "unknown key 'max_train_step' (did you mean max_train_steps?)" in capsys.readouterr().err


def test_validation_prompts_file_flax(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    args = train_text_to_image_flax.parse_args(command_line(T2I_REQUIRED, "--validation_prompts_file", prompts))
    assert args.validation_prompts == ["a red circle", "a blue square"]
