"""A skip is never quiet: a failure with its reason under TEST_SKIPS_FAIL=1 (as in CI), a banner otherwise.

Runs pytest on a small module of its own, in a subprocess, with this suite's conftest as a plugin, and
one xdist worker as `make test` runs them (a report from a worker arrives serialized).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import skips
from tests.support import ROOT, clean_env

MODULE = """
import pytest
from tests import skips

def test_passes():
    assert True

def test_needs_a_tool_that_is_not_here():
    skips.tool("no-such-tool-agg", install="apt-get install no-such-tool-agg")

@skips.unless("no throwaway servers here")
def test_needs_servers():
    assert True

@pytest.mark.xfail(reason="a known failure", strict=True)
def test_expected_to_fail():
    assert False
"""

MODULE_SKIPPED = """
import pytest
pytest.skip("the whole module needs root", allow_module_level=True)

def test_never_collected():
    assert True
"""


def run_pytest(tmp_path: Path, *, strict: bool, module: str = MODULE) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_tiny.py").write_text(module)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the suite's settings
    env = {k: v for k, v in clean_env(PYTHONPATH=str(ROOT)).items() if k != skips.STRICT}
    if strict:
        env[skips.STRICT] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-c",
            "pytest.ini",
            "-n",
            "1",
            "test_tiny.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_under_the_strict_setting_a_skip_fails_the_run_with_its_reason(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, strict=True)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    # A skip in the test body fails the test; a skip mark (decided at set-up) is an error at set-up.
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in out, out
    assert "no-such-tool-agg is not installed: apt-get install no-such-tool-agg" in out
    assert "no throwaway servers here" in out
    assert f"a skip fails the run here ({skips.STRICT}=1)" in out


def test_under_the_strict_setting_a_module_skipped_whole_fails_the_run(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, strict=True, module=MODULE_SKIPPED)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "the whole module needs root" in out
    assert "1 error" in out, out


def test_without_it_every_skip_is_listed_loudly_at_the_end(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, strict=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out  # locally a skip does not fail the run, but says so
    assert "2 SKIPPED: NOT TESTED, AND CI WOULD FAIL" in out, out
    banner = out[out.index("2 SKIPPED: NOT TESTED") :]
    assert "test_tiny.py::test_needs_a_tool_that_is_not_here: no-such-tool-agg is not installed" in banner
    assert "test_tiny.py::test_needs_servers: no throwaway servers here" in banner
    assert f"With {skips.STRICT}=1, as `.ci/run` sets it, each of them fails the run." in banner
    assert "test_expected_to_fail" not in banner  # an xfail is no skip


def test_without_skips_there_is_no_banner(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, strict=False, module="def test_passes():\n    assert True\n")
    assert result.returncode == 0, result.stdout
    assert "SKIPPED" not in result.stdout
