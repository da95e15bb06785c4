"""What `--help`, the README and docs/ say about the code, checked against the code.

Each test runs or reads the thing a sentence describes and looks for the sentence: when one of
them changes without the other, the test names both (claims that once drifted from the code).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ruamel.yaml import YAML

import exits
import replication
from replication import ReplicationState
from tests.support import ROOT, outside_checkout, run_cli, service_env

DOCS = ROOT / "docs"


def _paragraph(text: str, *needles: str) -> str:
    """The one paragraph (blank-line separated) holding every needle."""
    found = [p for p in re.split(r"\n\s*\n", text) if all(n in p for n in needles)]
    assert len(found) == 1, f"{len(found)} paragraphs hold {needles}"
    return found[0]


def _codes(text: str) -> set[int]:
    """The exit codes a sentence names: `exit 0`, `exits 0, 1, or 2`, `1 on ...`."""
    return {int(c) for c in re.findall(r"\b([0-9])\b", text)}


def _check_help() -> str:
    out = run_cli("--help", env=service_env(dbname="unused")).stdout
    # argparse wraps the option's help over several indented lines.
    match = re.search(r"^  --check\s+(.*?)\n  --", out, re.MULTILINE | re.DOTALL)
    assert match, out
    return " ".join(match.group(1).split())


def test_check_exit_codes_in_help_and_docs_are_the_ones_it_exits_with() -> None:
    # A configuration error: exit 2, without any server.
    bad = run_cli("--check", env=service_env(dbname="unused", BATCH_SIZE="abc"))
    assert bad.returncode == exits.CONFIG, bad.stderr
    said = {exits.OK, exits.FAILURE, bad.returncode}
    assert _codes(_check_help()) == said, _check_help()
    for path, needle in (
        (DOCS / "configuration.md", "`python aggregator.py --check`"),
        (DOCS / "deploying.md", "`--check` prints"),
    ):
        paragraph = _paragraph(path.read_text(), needle)
        sentence = paragraph[paragraph.index("exit") :]
        assert said <= _codes(sentence), f"{path.name}: {sentence!r}"


def test_verify_help_names_its_exit_codes() -> None:
    sub = run_cli("--help", env=service_env(dbname="unused")).stdout
    match = re.search(r"^    verify\s+(.*?)\n    \S", sub, re.MULTILINE | re.DOTALL)
    assert match, sub
    assert _codes(" ".join(match.group(1).split())) == {exits.OK, exits.FAILURE, exits.CONFIG}


def test_results_on_a_missing_database_exits_as_docs_tools_says() -> None:
    result = run_cli("results", env=service_env(dbname="agg_claims_no_such_database"))
    assert result.returncode == exits.CONFIG, result.stderr
    status = _paragraph((DOCS / "tools.md").read_text(), "Exit", "status: `0` printed")
    assert re.search(rf"`{result.returncode}` the database missing", status), status
    assert not re.search(r"`1`[^`]*missing database", status), status


def test_the_rule_count_in_docs_is_the_rule_count() -> None:
    alerts = YAML(typ="safe", pure=True).load(ROOT / "deploy" / "prometheus" / "alerts.yml")
    rules = sum(len(group["rules"]) for group in alerts["groups"])
    said = re.findall(r"SUCCESS: (\d+) rules found", (DOCS / "monitoring.md").read_text())
    assert said == [str(rules)]


@pytest.mark.parametrize(
    "path",
    ["deploy/vote-aggregator.env", "deploy/prometheus/alerts.yml", "deploy/prometheus/alerts.test.yml"],
)
def test_no_advice_to_grant_a_monitoring_role(path: str) -> None:
    # The role reads the standbys through init_db.sql's vote_replication_standbys(); pg_monitor and
    # pg_read_all_stats would also show it every session's queries (docs/security.md).
    text = (ROOT / path).read_text()
    assert not re.search(r"(?i)grant[^\n]*pg_read_all_stats|pg_monitor", text), path
    if "POSTGRES_REQUIRE_SYNC_STANDBY" in text or "replication" in text.lower():
        assert "service_role.sql" in text, path


def test_the_service_itself_gives_the_same_advice_when_it_cannot_read_the_standbys() -> None:
    # What it logs (and --check prints) for a role without vote_replication_standbys(), as
    # docs/high-availability.md shows it.
    unreadable = ReplicationState(server="db1:5432", standby_names="standby1", synchronous_commit="on",
                                  standbys=(("standby1", None, None),))  # fmt: skip
    line = replication.describe_replication(unreadable, user="aggregator")
    assert "apply init_db.sql and service_role.sql again as an administrator" in line
    assert not re.search(r"pg_read_all_stats|pg_monitor", line), line
    assert f"WARNING {line}" in (DOCS / "high-availability.md").read_text()


def test_dead_letters_are_moved_back_with_the_command_not_a_shovel() -> None:
    text = (DOCS / "high-availability.md").read_text()
    delivery_limit = _paragraph(text, "**The delivery limit counts every return.**")
    assert "dead-letters replay" in delivery_limit
    assert "shovel" not in delivery_limit
    replay = run_cli("dead-letters", "replay", "--help", env=service_env(dbname="unused"))
    assert replay.returncode == 0, replay.stderr


def test_help_and_version_work_before_the_requirements_are_installed() -> None:
    # -S: no site-packages, as on a fresh clone before `make run`: no pika, psycopg2 or dotenv.
    def bare(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", str(ROOT / "aggregator.py"), *args],
            cwd=outside_checkout(),
            env=service_env(dbname="unused"),
            capture_output=True,
            text=True,
            timeout=60,
        )

    no_pika = subprocess.run([sys.executable, "-S", "-c", "import pika"], capture_output=True, timeout=60)
    assert no_pika.returncode != 0, "-S still finds pika: this test would prove nothing"
    helped = bare("--help")
    assert helped.returncode == exits.OK, helped.stderr
    assert "RABBITMQ_HOST (default localhost)" in helped.stdout
    assert bare("--version").returncode == exits.OK
    # Anything else says what is missing and how to install it, in one line, as a configuration error.
    ran = bare("--check")
    assert ran.returncode == exits.CONFIG
    assert ran.stderr.strip().splitlines() == [
        f"error: Python module pika is not installed: run `make run`, or `{sys.executable} -m pip install "
        "-r requirements.txt` (README.md#quick-start-local)"
    ]


def _path_without(tmp_path: Path, *tools: str) -> str:
    """A PATH of one directory linking every command of this machine's PATH but `tools`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in reversed(os.environ["PATH"].split(os.pathsep)):
        if not Path(directory).is_dir():
            continue
        for command in Path(directory).iterdir():
            link = bin_dir / command.name
            if command.name not in tools and os.access(command, os.X_OK) and not link.is_symlink():
                link.symlink_to(command)
    return str(bin_dir)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the script as another user (runuser)")
def test_make_test_tools_installs_them_for_a_developer_who_is_not_root() -> None:
    # Not pytest's tmp_path: its parents are closed to other users.
    with tempfile.TemporaryDirectory(prefix="agg-developer-") as scratch:
        _install_as_developer(Path(scratch))


def _install_as_developer(tmp_path: Path) -> None:
    tools = ("promtool", "prometheus", "systemd-analyze", "prometheus-alertmanager", "amtool")
    path = _path_without(tmp_path, *tools)
    tmp_path.chmod(0o755)
    shutil.chown(tmp_path, user="nobody")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "scripts").mkdir()
    shutil.copy(ROOT / "Makefile", checkout)
    shutil.copy(ROOT / "scripts" / "install_test_tools.sh", checkout / "scripts")
    for item in (checkout, checkout / "scripts"):
        shutil.chown(item, user="nobody")

    def as_developer(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "nobody", "--", "env", f"PATH={path}", "HOME=/nonexistent", *command],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=300,
        )

    installed = as_developer("make", "test-tools")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "no root needed" in installed.stdout
    # Where `make test` looks first: each tool runs from there, nothing was installed system-wide.
    tools_bin = checkout / ".venv" / "tools" / "bin"
    for tool in tools:
        ran = as_developer(str(tools_bin / tool), "--version")
        assert ran.returncode == 0, f"{tool}: {ran.stderr}"
    makefile = (ROOT / "Makefile").read_text()
    (recipe,) = re.findall(r"^test:.*\n\t(.*)$", makefile, re.MULTILINE)
    assert recipe.startswith('PATH="$(abspath $(TOOLS_DIR))/bin:$$PATH" '), recipe
    assert re.search(r"^TOOLS_DIR \?= \$\(VENV\)/tools$", makefile, re.MULTILINE)
