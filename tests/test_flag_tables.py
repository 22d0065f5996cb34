"""The flag tables of docs/flags.md are exactly what each script's parser defines (devkit/flag_table.py)."""

import os

import pytest

from devkit.flag_table import flag_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["train_text_to_image.py", "textual_inversion.py"])
def test_flag_table_matches_parser(script):
    text = open(os.path.join(REPO, "docs", "flags.md")).read()
    section = text.split(f"## {script} flags", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table == flag_rows(script)
