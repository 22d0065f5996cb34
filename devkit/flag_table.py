"""The flag table of a script in docs/flags.md, from its argparse parser.

    python devkit/flag_table.py textual_inversion.py                # print it
    python devkit/flag_table.py --update docs/flags.md textual_inversion.py   # rewrite its table there

The Flax scripts import jax: run those with .venv-flax/bin/python.
"""

import argparse
import importlib.util
import os
import sys


def flag_rows(script):
    path = script if os.path.isfile(script) else os.path.join(os.path.dirname(os.path.dirname(__file__)), script)
    # A script imports the sdtrain package from its own folder, as when it is run.
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(script))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        module.parse_args([])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in captured["parser"]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = "off" if action.default is False else "—" if action.default is None else action.default
        rows.append(
            f"| `{action.option_strings[0]}` | {default} | {action.help}{' (required)' if action.required else ''} |"
        )
    return rows


def update_flag_table(path, script):
    """Replace the table under '## <script> flags' in the file at path (docs/flags.md) with the parser's."""
    text = open(path).read()
    head, rest = text.split(f"## {script} flags", 1)
    section, tail = (rest.split("\n## ", 1) + [None])[:2]
    lines = section.split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    last = max(i for i, line in enumerate(lines) if line.startswith("|"))
    section = "\n".join(lines[:first] + flag_rows(script) + lines[last + 1 :])
    with open(path, "w") as f:
        f.write(head + f"## {script} flags" + section + ("" if tail is None else "\n## " + tail))


if __name__ == "__main__":
    if sys.argv[1] == "--update":
        for name in sys.argv[3:]:
            update_flag_table(sys.argv[2], name)
    else:
        print("\n".join(flag_rows(sys.argv[1])))
