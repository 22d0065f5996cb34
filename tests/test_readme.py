"""The README's flag tables list exactly the flags each script accepts."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_flags(script):
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split(f"## {script} flags", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(--\w+)`", section, flags=re.M))


@pytest.mark.parametrize("script", ["train_text_to_image.py"])
def test_readme_flag_table_matches_parser(script):
    help_text = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    parser_flags = set(re.findall(r"(?<![\w-])(--\w+)", help_text)) - {"--help"}
    assert readme_flags(script) == parser_flags
