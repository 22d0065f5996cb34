"""Print the README flag table of a script from its argparse parser: python tests/flag_table.py textual_inversion.py"""

import argparse
import importlib
import os
import sys


def flag_rows(script):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
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
        rows.append(f"| `{action.option_strings[0]}` | {default} | {action.help}{' (required)' if action.required else ''} |")
    return rows


if __name__ == "__main__":
    print("\n".join(flag_rows(sys.argv[1])))
