"""The deployment files read as their tools read them: the systemd unit (keys, time spans), the
environment file, the Dockerfile's instructions and health check, the compose files (their
schema, bind mounts, `ports` entries) and the image pinning rule. Shared by the tests of
deploy/, the Kubernetes manifests and the alerting stack.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
import sys
from typing import Any

import jsonschema

from tests import skips
from tests.support import ROOT

UNIT = ROOT / "deploy" / "vote-aggregator.service"
ENV_EXAMPLE = ROOT / "deploy" / "vote-aggregator.env"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values (a key may repeat), over all sections; comments and continuations handled."""
    settings: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


SYSTEMD_INSTALL = "make test-tools installs it (Debian's systemd package)"


def systemd_analyze() -> str:
    return skips.tool("systemd-analyze", install=SYSTEMD_INSTALL)


def timespan_s(span: str) -> float:
    """A systemd time span in seconds, as systemd itself parses it."""
    out = subprocess.run(
        [systemd_analyze(), "timespan", span], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    match = re.search(r"μs:\s*(\d+)", out)
    assert match, out
    return int(match.group(1)) / 1e6


def env_file_assignments(text: str, *, commented: bool) -> dict[str, str]:
    """VARIABLE=value lines of an EnvironmentFile; with `commented`, also the `#VARIABLE=value` examples."""
    found: dict[str, str] = {}
    pattern = r"#?\s*([A-Z][A-Z0-9_]*)=(.*)" if commented else r"([A-Z][A-Z0-9_]*)=(.*)"
    for line in text.splitlines():
        match = re.fullmatch(pattern, line.strip())
        if match:
            value = match.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            found[match.group(1)] = value
    return found


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for logical in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if logical.strip():
            word, _, rest = logical.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(arguments: str) -> list[str] | None:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def healthcheck_command() -> list[str]:
    (healthcheck,) = [a for w, a in dockerfile_instructions(DOCKERFILE.read_text()) if w == "HEALTHCHECK"]
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command, "HEALTHCHECK must use the exec form"
    return [sys.executable if part == "python" else part for part in command]


def compose_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendored.joinpath("compose-spec.json").read_text())
    return schema


def compose_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(
        compose_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document))


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            if source.startswith((".", "/", "~")):
                mounts.append((source, target))
        elif volume.get("type") == "bind":
            mounts.append((volume["source"], volume["target"]))
    return mounts


def interpolate(value: str, environment: dict[str, str]) -> str:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR."""

    def one(match: re.Match[str]) -> str:
        name, operator, default = match.group("name") or match.group("bare"), match.group("op"), match.group("default")
        if operator == ":-":
            return environment.get(name) or default
        if operator == "-":
            return environment.get(name, default)
        return environment.get(name, "")

    pattern = r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$(?P<bare>\w+)"
    return re.sub(pattern, one, value)


def port_mapping(entry: str | dict[str, Any], environment: dict[str, str]) -> tuple[str, str, str]:
    """(host address, published port, container port) of one `ports` entry; "" for no address."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "")), str(entry.get("published", "")), str(entry["target"])
    text = interpolate(entry, environment).split("/")[0]  # [ADDRESS:][PUBLISHED:]TARGET[/PROTOCOL]
    address = ""
    if text.startswith("["):  # an IPv6 address
        address, _, text = text.partition("]:")
        address += "]"
    parts = text.split(":")
    assert 1 <= len(parts) <= (2 if address else 3), f"cannot read ports entry {entry!r}"
    if len(parts) == 3:
        address = parts.pop(0)
    published = parts[0] if len(parts) == 2 else ""
    return address, published, parts[-1]


def pinned(image: str) -> bool:
    """Whether an image reference names one release: 3.13.7-management, v2.55.1, a digest; for
    PostgreSQL, whose releases have two numbers since version 10, 16.4-bookworm."""
    name, _, tag = image.partition("@")[0].rpartition(":")
    numbers = 2 if name.rsplit("/", 1)[-1] == "postgres" else 3
    digest = image.partition("@")[2]
    return bool(
        name
        and re.fullmatch(rf"v?\d+(?:\.\d+){{{numbers - 1}}}(?:-[\w.-]+)?", tag)
        and (not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest))
    )
