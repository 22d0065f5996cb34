"""The Flax twins' command line: --help and a mistyped flag answer before JAX loads, in one line."""

import pytest
from conftest import OFFLINE_ENV, REPO

from devkit.command_line import mistyped_flag_case, run_as_main


@pytest.mark.parametrize("script", ["train_text_to_image_flax.py", "textual_inversion_flax.py"])
def test_help_and_a_mistyped_flag_answer_before_jax_loads(script):
    shown = run_as_main(script, "--help", cwd=REPO, env=OFFLINE_ENV)
    assert "--pretrained_model_name_or_path" in shown.stdout and "--debug" in shown.stdout
    assert shown.stdout.splitlines()[-1] == "imported: [] exit: 0"
    argv, expected = mistyped_flag_case(script)
    mistyped = run_as_main(script, *argv, cwd=REPO, env=OFFLINE_ENV)
    assert mistyped.stdout.splitlines()[-1] == "imported: [] exit: 2"
    assert mistyped.stderr.splitlines() == [expected]
