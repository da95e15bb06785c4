"""A throwaway PostgreSQL cluster under Patroni, with etcd as its store, for failover tests.

Three members (pg1, pg2, pg3) and one etcd on free loopback ports, all in a directory of their own
under the temporary directory, `agg-patroni-<pid of the test run>-...`, running as the `postgres`
OS user. Every process is started here and stopped by its own pid, never by name; a run killed
half-way leaves a directory whose processes the next run kills (by the pids recorded in it, after
checking that each still runs from that directory) before removing it.

Debian's `patroni` (3.0.2 here) and `etcd-server` (3.4) packages; `scripts/install_test_tools.sh`
installs them. The recipe is the one of shared/recipes/throwaway-servers.md ("PostgreSQL under
Patroni"), with synchronous_mode and synchronous_mode_strict on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from tests.pg_servers import PG_BIN
from tests.pg_servers import unavailable as pg_unavailable
from tests.support import alive, execute, reused_connection, wait_for
from tools.ports import free_port

_PREFIX = "agg-patroni-"
NAMES = ("pg1", "pg2", "pg3")
# Patroni's timing as the recipe tried it: the leader key lives 10 s, each member's loop turns every
# 2 s. A dead leader is replaced about `ttl` after its last renewal.
DCS = {
    "ttl": 10,
    "loop_wait": 2,
    "retry_timeout": 4,
    "synchronous_mode": True,
    "synchronous_mode_strict": True,
    "postgresql": {
        "use_pg_rewind": True,
        "use_slots": True,
        "parameters": {
            "wal_level": "replica",
            "hot_standby": "on",
            "wal_log_hints": "on",  # pg_rewind needs it (or data checksums)
            "max_connections": 60,
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "shared_buffers": "16MB",
            # A standby whose primary went away tries the new one this soon (PostgreSQL's default is
            # 5 s): in strict synchronous mode no commit returns on a new leader before a standby
            # streams from it (docs/high-availability.md#patroni).
            "wal_retrieve_retry_interval": "500ms",
            # Throwaway servers: a crash of the machine is not tested, a crash of PostgreSQL is
            # (kill -9 leaves the page cache intact). synchronous_commit stays on: it is the point.
            "fsync": "off",
        },
    },
}


def unavailable() -> str | None:
    """None if a Patroni cluster can be made here, else why not (for pytest.skip)."""
    reason = pg_unavailable()
    if reason is not None:
        return reason
    for program in ("patroni", "etcd"):
        if shutil.which(program) is None:
            return (
                f"{program} is missing: scripts/install_test_tools.sh installs it (apt-get install patroni etcd-server)"
            )
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def remove_leftovers() -> None:
    """Kill the processes of clusters whose test run is gone, and remove their directories."""
    for base in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        match = re.fullmatch(rf"{_PREFIX}(\d+)-.*", base.name)
        if not match or alive(int(match.group(1))):
            continue
        pids = [int(p) for p in (base / "pids").read_text().split()] if (base / "pids").exists() else []
        pids += [pid for name in NAMES if (pid := _postmaster_pid(base / name)) is not None]
        for pid in pids:
            if str(base) in _cmdline(pid):  # still one of ours, not a recycled pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


class Member:
    """One Patroni member: its configuration, its Patroni process and its PostgreSQL."""

    def __init__(self, cluster: PatroniCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.port = free_port()
        self.rest_port = free_port()
        self.data = cluster.base / name
        self.log = cluster.base / f"{name}.log"
        self.config = cluster.base / f"{name}.yml"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        base = self.cluster.base
        config = {
            "scope": "votes",
            "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{self.rest_port}", "connect_address": f"127.0.0.1:{self.rest_port}"},
            "etcd3": {"host": f"127.0.0.1:{self.cluster.etcd_port}"},
            "bootstrap": {
                "dcs": DCS,
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}],
                "pg_hba": [
                    "local all all trust",
                    "host replication all 127.0.0.1/32 trust",
                    "host all all 127.0.0.1/32 trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.port}",
                "connect_address": f"127.0.0.1:{self.port}",
                "data_dir": str(self.data),
                "bin_dir": str(PG_BIN),
                "pgpass": str(base / f"{self.name}.pgpass"),
                "authentication": {
                    "replication": {"username": "postgres"},
                    "superuser": {"username": "postgres"},
                    "rewind": {"username": "postgres"},
                },
                "parameters": {"unix_socket_directories": str(base)},
            },
        }
        # JSON is YAML: no YAML writer needed.
        self.config.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        """Start its Patroni (which starts, rewinds or bootstraps its PostgreSQL)."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["patroni", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cluster.base,
                user="postgres",
                group="postgres",
                start_new_session=True,
            )
        self.cluster.record_pid(self.proc.pid)

    def kill(self) -> None:
        """kill -9 of Patroni and of its PostgreSQL: a machine that dies."""
        postmaster = _postmaster_pid(self.data)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=30)
        if postmaster is not None and str(self.data) in _cmdline(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGKILL)
            wait_for(lambda: not alive(postmaster), timeout=30, what=f"{self.name}'s postmaster gone")

    def stop(self) -> None:
        """SIGTERM to Patroni: it stops its PostgreSQL, then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    # -- as a client ------------------------------------------------------------------------------

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg2.extensions.connection:
        params: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": dbname}
        conn: psycopg2.extensions.connection = psycopg2.connect(**{**params, "connect_timeout": 2, **kwargs})
        conn.autocommit = True
        return conn

    def execute(
        self, statement: str, params: tuple[Any, ...] = (), *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """One statement as the superuser, on the test's kept connection to `dbname` (a new one
        once the member ended the last: a kill, a restart, a demotion)."""
        conn = reused_connection("127.0.0.1", self.port, dbname, lambda: self.connect(dbname))
        return execute(conn, statement, params)

    def writable(self) -> bool:
        """Whether its PostgreSQL answers and accepts writes (is not in recovery)."""
        try:
            return self.execute("SELECT NOT pg_is_in_recovery()")[0][0] is True
        except psycopg2.Error:
            return False

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class PatroniCluster:
    """etcd and three Patroni members; `start()` waits for a leader and a synchronous standby."""

    def __init__(self) -> None:
        remove_leftovers()
        self.base = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        os.chmod(self.base, 0o755)
        shutil.chown(self.base, "postgres", "postgres")
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.etcd: subprocess.Popen[bytes] | None = None
        self.members = {name: Member(self, name) for name in NAMES}

    def record_pid(self, pid: int) -> None:
        with (self.base / "pids").open("a") as f:
            f.write(f"{pid}\n")

    def start(self) -> PatroniCluster:
        client, peer = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self.etcd_peer_port}"
        with (self.base / "etcd.log").open("ab") as log:
            self.etcd = subprocess.Popen(
                ["etcd", "--name", "e1", "--data-dir", str(self.base / "etcd"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"e1={peer}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.base, user="postgres", group="postgres",
                start_new_session=True,
            )  # fmt: skip
        self.record_pid(self.etcd.pid)
        wait_for(self._etcd_answers, timeout=30, what="etcd to answer")
        first, *others = self.members.values()
        for member in self.members.values():
            member.write_config()
        first.start()  # bootstraps the cluster (initdb); the others copy it with pg_basebackup
        wait_for(first.writable, timeout=90, what="pg1 to bootstrap the cluster")
        for member in others:
            member.start()
        self.wait_healthy(timeout=120)
        return self

    def _etcd_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop every member (each stops its PostgreSQL), then etcd; remove the directory."""
        try:
            for member in self.members.values():
                member.stop()
            for member in self.members.values():
                pid = _postmaster_pid(member.data)
                if pid is not None and str(member.data) in _cmdline(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if self.etcd is not None:
                self.etcd.terminate()
                try:
                    self.etcd.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.etcd.kill()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- what Patroni says ----------------------------------------------------------------------

    def cluster_state(self) -> list[dict[str, Any]]:
        """Patroni's GET /cluster (members with name, role, state, port, timeline, lag), asked of
        any member that answers; [] if none does."""
        for member in self.members.values():
            if member.proc is None or member.proc.poll() is not None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{member.rest_port}/cluster", timeout=2) as resp:
                    return list(json.load(resp)["members"])
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                continue
        return []

    def roles(self) -> dict[str, str]:
        """name -> role ("leader", "sync_standby", "replica") of the members that are running."""
        return {m["name"]: m["role"] for m in self.cluster_state() if m.get("state") in ("running", "streaming")}

    def leader(self) -> Member:
        def found() -> Member | None:
            names = [name for name, role in self.roles().items() if role in ("leader", "master")]
            return self.members[names[0]] if len(names) == 1 and self.members[names[0]].writable() else None

        member: Member = wait_for(found, timeout=60, what="a leader that accepts writes")
        return member

    def wait_healthy(self, *, timeout: float = 60) -> None:
        """Every member running, one leader, one synchronous standby, every replica streaming."""

        def healthy() -> bool:
            state = self.cluster_state()
            roles = sorted(m["role"] for m in state if m.get("state") in ("running", "streaming"))
            return len(state) == 3 and roles in (
                ["leader", "replica", "sync_standby"],
                ["leader", "sync_standby", "sync_standby"],
            )

        wait_for(healthy, timeout=timeout, interval=0.2, what=f"the Patroni cluster healthy: {self.cluster_state()}")

    def switchover(self, *, leader: Member, candidate: Member) -> None:
        """Patroni's planned switchover (POST /switchover), as `patronictl switchover` asks it."""
        body = json.dumps({"leader": leader.name, "candidate": candidate.name}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{leader.rest_port}/switchover",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 200, resp.read()

    def edit_config(self, **settings: Any) -> dict[str, Any]:
        """Patroni's dynamic configuration changed (PATCH /config, as `patronictl edit-config`
        does); the configuration as it now stands in etcd. The members apply it at their next turn."""
        leader = self.leader()
        request = urllib.request.Request(
            f"http://127.0.0.1:{leader.rest_port}/config",
            data=json.dumps(settings).encode(),
            method="PATCH",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200, resp.read()
            config: dict[str, Any] = json.load(resp)
        return config

    def env(self, dbname: str, *, order: list[Member] | None = None, **overrides: str) -> dict[str, str]:
        """The service's settings: every member in a libpq host list (pg1, pg2, pg3 unless `order`)."""
        members = order or list(self.members.values())
        return {
            "POSTGRES_HOST": ",".join("127.0.0.1" for _ in members),
            "POSTGRES_PORT": ",".join(str(m.port) for m in members),
            "POSTGRES_DB": dbname,
            **overrides,
        }
