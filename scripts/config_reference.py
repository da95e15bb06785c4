"""Write the configuration reference of docs/configuration.md from the code's own variable list.

    python scripts/config_reference.py            # print the table
    python scripts/config_reference.py --write    # rewrite it in docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 if docs/configuration.md is out of date

The table comes from `config.variables()` (names and defaults, in the order the service reads
them) and `config.HELP` (one line each), so that a variable added to config.py reaches the docs
by re-running this script, and tests/test_docs.py fails until someone does.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED: python scripts/config_reference.py --write -->"
END = "<!-- END GENERATED -->"
COMMAND = "python scripts/config_reference.py --write"

# Run as a script, the repository root is not on sys.path; config.py lives there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config  # noqa: E402


def _default(value: object) -> str:
    # Shown as --help shows them: booleans as the words the parser accepts, "" as unset.
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return "unset"
    shown = str(value).replace("|", "\\|")  # GitHub ends a table cell at "|" even inside backticks
    return f"`{shown}`"


def _text(line: str) -> str:
    # HELP is plain text: "<RABBITMQ_QUEUE>" would read as an HTML tag and "|" would end the cell.
    line = line.replace("|", "\\|")
    parts = re.split(r"(<[A-Za-z_]+>[\w.]*)", line)
    return "".join(f"`{part}`" if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def table() -> str:
    """The Markdown table of every variable, its default and its meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, value in config.variables().items():
        rows.append(f"| `{name}` | {_default(value)} | {_text(config.HELP[name])} |")
        rows += [
            f"| `{file_name}` | unset | {_text(config.SECRET_FILES_HELP[file_name])} |"
            for file_name, secret in config.SECRET_FILES.items()
            if secret == name
        ]
    return "\n".join(rows) + "\n"


def render(document: str) -> str:
    """`document` with the text between the markers replaced by the current table."""
    start = document.find(BEGIN)
    end = document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{DOC.relative_to(ROOT)} lacks the markers {BEGIN!r} ... {END!r}")
    return document[: start + len(BEGIN)] + "\n" + table() + document[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite the table in {DOC.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed table is out of date")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(table())
        return 0
    current = DOC.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if current != wanted:
            print(f"{DOC.relative_to(ROOT)} is out of date; regenerate it with: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        DOC.write_text(wanted, encoding="utf-8")
        print(f"rewrote the table in {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
