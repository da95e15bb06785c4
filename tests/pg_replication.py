"""A throwaway PostgreSQL primary with a streaming standby, for failover tests.

Both are tests.pg_servers.PgServer clusters (free loopback ports, their own directories, stopped by
data directory, leftovers of aborted runs removed). The standby is made with pg_basebackup and
follows the primary as `application_name` "standby1"; the primary names it in
synchronous_standby_names when `synchronous` (the recipe of shared/recipes/throwaway-servers.md).
Unlike the other throwaway servers, these keep synchronous_commit on: a crash of the primary must
not lose what it acknowledged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tests.pg_servers import PG_BIN, PgServer, _as_postgres
from tests.support import wait_for

STANDBY_NAME = "standby1"


def primary(*, synchronous: bool) -> PgServer:
    """A primary that standbys may stream from; synchronous_standby_names names STANDBY_NAME when `synchronous`."""
    return PgServer(
        settings={
            "wal_level": "replica",
            "synchronous_commit": "on",
            "synchronous_standby_names": f"'{STANDBY_NAME}'" if synchronous else "''",
            "max_wal_senders": "5",
            # Every instance of the service opens a few connections; the tests run several at once.
            "max_connections": "50",
        },
        hba=["host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"],
    )


class PgStandby(PgServer):
    """A streaming standby of `source`, made with pg_basebackup; `promote()` makes it a primary."""

    def __init__(self, source: PgServer, *, name: str = STANDBY_NAME) -> None:
        super().__init__()
        self.source = source
        self.name = name

    def _create(self) -> None:
        os.chmod(self.base, 0o755)
        shutil.chown(self.base, "postgres", "postgres")
        _as_postgres(
            str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.source.port), "-U", "postgres",
            "-D", str(self.data), "-R", "-X", "stream", "--no-sync",
            # At once: a spread checkpoint on a server that has just been written to (or promoted)
            # takes minutes.
            "--checkpoint=fast",
        )  # fmt: skip
        settings = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "hot_standby": "on",
            # Once promoted, it must not wait for a standby of its own that does not exist.
            "synchronous_standby_names": "''",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                f"primary_conninfo = 'host=127.0.0.1 port={self.source.port} user=postgres "
                f"application_name={self.name}'\n"
            )
        self._created = True

    def wait_streaming(self, *, sync_state: str = "sync", timeout: float = 30) -> None:
        """Until the primary reports this standby streaming with `sync_state` (sync, async, ...)."""

        def streaming() -> bool:
            rows = self.source.execute(
                "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s", (self.name,)
            )
            return rows == [("streaming", sync_state)]

        wait_for(streaming, timeout=timeout, interval=0.1, what=f"{self.name} streaming ({sync_state})")


def pair(*, synchronous: bool) -> tuple[PgServer, PgStandby]:
    """A started primary and a started standby streaming from it."""
    main = primary(synchronous=synchronous).start()
    standby = PgStandby(main)
    try:
        standby.start()
        standby.wait_streaming(sync_state="sync" if synchronous else "async")
    except BaseException:
        standby.remove()
        main.remove()
        raise
    return main, standby


@contextmanager
def frozen(server: PgServer) -> Iterator[None]:
    """`server` stopped with SIGSTOP (its postmaster and their children) until the block ends.

    For a standby: it stays connected, so the primary still lists it as synchronous, but it
    confirms nothing, and the primary's commits wait for it.
    """
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(postmaster)], check=True, capture_output=True, text=True
    ).stdout.split()
    pids = [postmaster, *(int(pid) for pid in children)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
