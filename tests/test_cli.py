"""The command line as a user meets it: --help and a mistyped flag answer before the frameworks load, and a mistake is
one `error: ...` line naming the culprit, with no Python traceback unless --debug asks for it."""

import os
import subprocess

import pytest
from conftest import BIN, OFFLINE_ENV, REPO

from devkit.command_line import command_line, mistyped_flag_case, run_as_main


@pytest.mark.parametrize("script", ["train_text_to_image.py", "textual_inversion.py"])
def test_help_and_a_mistyped_flag_answer_before_any_framework_loads(script):
    shown = run_as_main(script, "--help", cwd=REPO, env=OFFLINE_ENV)
    assert "--pretrained_model_name_or_path" in shown.stdout and "--debug" in shown.stdout
    assert shown.stdout.splitlines()[-1] == "imported: [] exit: 0"
    argv, expected = mistyped_flag_case(script)
    mistyped = run_as_main(script, *argv, cwd=REPO, env=OFFLINE_ENV)
    assert mistyped.stdout.splitlines()[-1] == "imported: [] exit: 2"
    # One line, the culprit and the closest flag; not the usage of every flag.
    assert mistyped.stderr.splitlines() == [expected]


@pytest.fixture(scope="module")
def missing_data(launch, assets, tmp_path_factory):
    """Arguments that parse but name a data folder that does not exist: found only once the run starts."""
    missing = str(tmp_path_factory.mktemp("nothing") / "no-such-folder")
    out = str(tmp_path_factory.mktemp("cli") / "out")
    args = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", missing]
    return missing, command_line(*args, "--output_dir", out, "--resolution 64 --max_train_steps 1")


def test_a_mistake_found_at_run_time_is_one_error_line_without_a_traceback(assets, missing_data):
    """accelerate launch -q: the launcher adds no CalledProcessError of its own, so the error line is all there is."""
    missing, args = missing_data
    command = [os.path.join(BIN, "accelerate"), "launch", "-q", "--config_file", assets["accelerate_config"]]
    env = {**os.environ, **OFFLINE_ENV}
    result = subprocess.run(
        command + ["train_text_to_image.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == f"error: --train_data_dir {missing}: no such folder"


def test_debug_shows_the_traceback(launch, missing_data):
    missing, args = missing_data
    result = launch.accelerate("train_text_to_image.py", [*args, "--debug"], check=False)
    assert result.returncode != 0
    assert f"UserError: --train_data_dir {missing}: no such folder" in result.output
    assert 'train_text_to_image.py", line' in result.output, "the script's own frames are shown"
