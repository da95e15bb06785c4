"""Throwaway PostgreSQL clusters, for tests that reconfigure, restart, demote or promote a server.

The shared server (127.0.0.1:5432) is never touched. Each cluster lives in a directory of its own
under the temporary directory, named `agg-pg-<pid of the test run>-...`, listens on a free loopback
port and is stopped by its data directory (`pg_ctl -D`), never by process name. A run that was
killed half-way leaves such directories behind: the next run stops and removes those whose test
run is gone (`remove_leftovers`).

initdb and pg_ctl refuse to run as root, so they run as the `postgres` OS user (the tests run as
root). A cluster takes about a second to create and start; fixtures share one per module where the
tests allow it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from tests.support import alive, execute, reused_connection, wait_for
from tools.ports import free_port

_PREFIX = "agg-pg-"
_LOCALES = Path(tempfile.gettempdir()) / "agg-test-locales"


def _pg_bin() -> Path:
    """TEST_PG_BIN, or the newest Debian-packaged PostgreSQL's bin/ (the shared server's packages)."""
    if "TEST_PG_BIN" in os.environ:
        return Path(os.environ["TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def unavailable() -> str | None:
    """None if throwaway clusters can be made here, else why not (for pytest.skip)."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {PG_BIN} (set TEST_PG_BIN)"
    if os.geteuid() != 0:
        return "the tests must run as root to start a cluster as the postgres user"
    if shutil.which("runuser") is None:
        return "runuser is missing"
    return None


def _as_postgres(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> None:
    command = ["runuser", "-u", "postgres", "--", "env", *(f"{k}={v}" for k, v in (env or {}).items()), *args]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)


def remove_leftovers() -> None:
    """Stop and remove the clusters of test runs that no longer exist."""
    for base in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        match = re.fullmatch(rf"{_PREFIX}(\d+)-.*", base.name)
        if not match or alive(int(match.group(1))):
            continue
        data = base / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop", timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def message_locale(name: str) -> Path | None:
    """A directory holding the locale `name` (e.g. "de_DE.UTF-8"), for LOCPATH; None if it cannot be made.

    Compiled once with localedef (Debian's `locales` package ships the sources) into a directory of
    the tests' own, so the machine's installed locales are left as they are.
    """
    if (_LOCALES / name).is_dir():
        return _LOCALES
    source, _, charmap = name.partition(".")
    if shutil.which("localedef") is None or not Path("/usr/share/i18n/locales", source).exists():
        return None
    _LOCALES.mkdir(mode=0o755, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=_LOCALES))
    try:
        subprocess.run(
            ["localedef", "-i", source, "-f", charmap or "UTF-8", str(building / name)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        building.chmod(0o755)
        with contextlib.suppress(OSError):  # another run finished first: keep its copy
            (building / name).rename(_LOCALES / name)
    except (subprocess.SubprocessError, OSError):
        return None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return _LOCALES if (_LOCALES / name).is_dir() else None


class PgServer:
    """One throwaway cluster on 127.0.0.1:<free port>, superuser `postgres` trusted locally.

    `settings` go into postgresql.conf; `hba` replaces pg_hba.conf's lines (default: trust all on
    127.0.0.1); `locpath` is handed to the server as LOCPATH (see message_locale); `files` are
    copied into the data directory, readable by the server only (a TLS certificate and its key:
    PostgreSQL refuses a key that others can read); `connect_options` are libpq's for every
    connection of the tests' own (sslmode=require where pg_hba.conf refuses any other).
    """

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        hba: Sequence[str] | None = None,
        locpath: Path | None = None,
        files: Mapping[str, Path] | None = None,
        connect_options: Mapping[str, str] | None = None,
    ) -> None:
        remove_leftovers()
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self._settings = dict(settings or {})
        self._hba = list(hba or ["host all all 127.0.0.1/32 trust"])
        self._env = {"LOCPATH": str(locpath)} if locpath else {}
        self._files = dict(files or {})
        self._connect_options = dict(connect_options or {})
        self._created = False

    # -- life cycle -------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> PgServer:
        """Create the cluster on first use, then start it (waiting until it accepts connections)."""
        if not self._created:
            self._create()
        args = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log)]
        _as_postgres(*args, *(["-w", "-t", "60"] if wait else ["-W"]), "start", env=self._env)
        if wait:
            wait_for(self.answers, timeout=30, what=f"PostgreSQL on port {self.port} to accept connections")
        return self

    def _create(self) -> None:
        os.chmod(self.base, 0o755)
        shutil.chown(self.base, "postgres", "postgres")
        _as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C.UTF-8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        for name, source in self._files.items():
            target = self.data / name
            shutil.copyfile(source, target)
            shutil.chown(target, "postgres", "postgres")
            target.chmod(0o600)
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "30",
            "shared_buffers": "16MB",
            **self._settings,
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        (self.data / "pg_hba.conf").write_text("local all all trust\n" + "".join(f"{line}\n" for line in self._hba))
        self._created = True

    def run_as_postgres(self, *args: str, timeout: float = 120) -> None:
        """One of PostgreSQL's programs (pg_basebackup, ...), by name, as the `postgres` OS user."""
        _as_postgres(str(PG_BIN / args[0]), *args[1:], timeout=timeout)

    def restore_from(self, backup: Path, *, settings: Mapping[str, str]) -> PgServer:
        """Make this (not yet created) cluster a copy of a plain-format base backup that recovers
        with `settings` (restore_command, recovery_target_*) on start; its own port and socket."""
        assert not self._created, "restore_from() is for a new cluster"
        os.chmod(self.base, 0o755)
        shutil.chown(self.base, "postgres", "postgres")
        _as_postgres("cp", "-a", str(backup), str(self.data))
        settings = {"port": str(self.port), "unix_socket_directories": f"'{self.base}'", **settings}
        _as_postgres("touch", str(self.data / "recovery.signal"))
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._created = True
        return self

    def stop(self, *, mode: str = "fast") -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", timeout=60)

    def make_standby(self, *, hot_standby: bool = False) -> None:
        """Restart as a standby with nothing to follow: it answers, but (hot_standby off) refuses
        every connection with 57P03 until promote()."""
        self.stop()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"hot_standby = {'on' if hot_standby else 'off'}\n")
        (self.data / "standby.signal").touch()
        shutil.chown(self.data / "standby.signal", "postgres", "postgres")
        self.start(wait=False)

    def promote(self) -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote")

    def remove(self) -> None:
        """Stop the server (immediate) and delete its directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(subprocess.SubprocessError):
                    self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- as a client -------------------------------------------------------------------

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg2.extensions.connection:
        params: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": dbname}
        conn: psycopg2.extensions.connection = psycopg2.connect(**{**params, **self._connect_options, **kwargs})
        conn.autocommit = True
        return conn

    def answers(self) -> bool:
        try:
            self.connect(connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def execute(
        self, statement: str, params: tuple[Any, ...] = (), *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """One statement as the superuser, on the test's kept connection to `dbname` (a new one
        once the server ended the last: a stop, a crash, a promotion)."""
        conn = reused_connection("127.0.0.1", self.port, dbname, lambda: self.connect(dbname, connect_timeout=5))
        return execute(conn, statement, params)

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def env(self, dbname: str, **overrides: str) -> dict[str, str]:
        """The service's variables pointing at this server (merge into tests.support.service_env)."""
        return {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(self.port), "POSTGRES_DB": dbname, **overrides}
