"""The documentation: generated reference up to date, every relative link and anchor resolving.

No servers needed: these read files only.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import pytest
from ruamel.yaml import YAML

import config
from tests.prometheus import runbook_url, runbook_url_template

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MONITORING = DOCS / "monitoring.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
README_MAX_LINES = 150


def _load_generator() -> ModuleType:
    # scripts/ is a directory of commands, not a package: load the generator from its file.
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_reference = _load_generator()


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and "_", as GitHub does
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link into `path` may use: its headings' slugs (numbered when repeated)."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, flags=re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found.update(re.findall(r"""<a\s+(?:id|name)=["']([^"']+)["']""", text))
    return found


def relative_links(path: Path) -> list[str]:
    """Targets of the Markdown links in `path` that are not absolute URLs."""
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{shown(path)}: ({target})"
        if not destination.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: no heading with anchor #{anchor} in {shown(destination)}")
        elif anchor and destination.suffix != ".md":
            problems.append(f"{where}: an anchor into a file that is not Markdown")
    return problems


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path)


# -- the configuration reference --------------------------------------------------------------------


def test_configuration_reference_matches_config_py() -> None:
    committed = config_reference.DOC.read_text(encoding="utf-8")
    assert committed == config_reference.render(committed), (
        f"the variable table in docs/configuration.md differs from config.py; "
        f"regenerate it with: {config_reference.COMMAND}"
    )


def test_configuration_reference_names_every_variable_once() -> None:
    table = config_reference.table()
    for name, default in config.variables().items():
        rows = [line for line in table.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, f"{name}: {len(rows)} rows"
        if default not in ("", True, False):
            assert f"`{default}`" in rows[0], rows[0]


def test_a_stale_reference_is_detected() -> None:
    committed = config_reference.DOC.read_text(encoding="utf-8")
    stale = "\n".join(line for line in committed.splitlines() if not line.startswith("| `BATCH_SIZE` |")) + "\n"
    assert config_reference.render(stale) != stale
    assert config_reference.render(config_reference.render(stale)) == config_reference.render(stale)


def test_config_reference_check_command_passes() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# -- links ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("VoteAggregatorDown", "voteaggregatordown"),
        ("What happens when ...", "what-happens-when-"),
        ("Results: `python aggregator.py results`", "results-python-aggregatorpy-results"),
        ("A 50,000-message run", "a-50000-message-run"),
        ("PostgreSQL refuses one vote's data", "postgresql-refuses-one-votes-data"),
        ("The `RABBITMQ_QUEUE` [link](x.md)", "the-rabbitmq_queue-link"),
    ],
)
def test_slug_follows_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_link_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## VoteAggregatorDown\n")
    probe = tmp_path / "probe.md"
    probe.write_text(
        "# Probe\n\n[ok](other.md#voteaggregatordown) [ok](#probe) [ok](https://example.org/x.md#y)\n"
        "[bad](other.md#no-such-alert) [bad](missing.md)\n\n`[code](ignored.md)`\n"
    )
    problems = broken_links(probe)
    assert len(problems) == 2, problems
    assert "no heading with anchor #no-such-alert" in problems[0]
    assert "missing.md does not exist" in problems[1]


def test_every_relative_link_in_readme_and_docs_resolves() -> None:
    problems = [problem for path in markdown_files() for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_scaling_md_is_merged_into_performance_md() -> None:
    assert not (DOCS / "scaling.md").exists()
    for path in markdown_files():
        assert "scaling.md" not in path.read_text(encoding="utf-8"), path


# -- the README ---------------------------------------------------------------------------------------


def test_readme_is_short_and_names_the_test_command() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make test" in text
    assert "make run" in text
    for path in sorted(DOCS.glob("*.md")):
        assert f"docs/{path.name}" in text, f"README's map of docs/ lacks {path.name}"


# -- alerts -------------------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_a_runbook_url_to_its_own_section() -> None:
    sections = anchors(MONITORING)
    rules = alert_rules()
    assert rules
    for rule in rules:
        name = rule["alert"]
        url = rule["annotations"].get("runbook_url", "")
        # The base comes from the Prometheus external label, with a fallback that says it is unset.
        assert url == runbook_url_template(name), f"{name}: runbook_url {url!r}"
        anchor = url.rpartition("#")[2]
        assert anchor in sections, f"{name}: docs/monitoring.md has no section #{anchor}"


def test_alert_tests_expect_the_fallback_runbook_urls() -> None:
    # promtool 2.42 sets no external labels in rule tests: the links there are the fallback ones.
    # promtool compares annotations exactly; this says which file to change when they differ.
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts") or []:
                expected = alert["exp_annotations"].get("runbook_url")
                assert expected == runbook_url(check["alertname"], {}), f"{ALERT_TESTS.name}, {check['alertname']}"
