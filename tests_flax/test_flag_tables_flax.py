"""The flag tables of docs/flags.md for the Flax twins are exactly what their parsers define (devkit/flag_table.py)."""

import os

import pytest
from conftest import REPO

from devkit.flag_table import flag_rows


@pytest.mark.parametrize("script", ["train_text_to_image_flax.py", "textual_inversion_flax.py"])
def test_flag_table_matches_parser(script):
    text = open(os.path.join(REPO, "docs", "flags.md")).read()
    section = text.split(f"## {script} flags", 1)[1].split("\n## ", 1)[0]
    assert [line for line in section.splitlines() if line.startswith("|")] == flag_rows(script)
