"""Signed chain heads, kept outside the database (docs/security.md#signed-heads).

Every CHAIN_HEADS_INTERVAL_SECONDS, and once more at each stop (marked final), the instance signs
the head of each of its chains that grew with its Ed25519 key (CHAIN_SIGNING_KEY_FILE) and appends
it, one JSON object a line, to CHAIN_HEADS_FILE, and publishes the same line to the
CHAIN_HEADS_EXCHANGE exchange, for observers on other hosts to keep. `aggregator.py verify
--heads FILE --keys PUBLIC_KEYS` then checks the database against them. Nothing here depends on
LOG_LEVEL.

A record is signed over its canonical JSON (sorted keys, no spaces, ASCII) without "signature".
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from chain import Chains, Link
from config import Config

if TYPE_CHECKING:
    import pika

# pika and amqp.py are imported where HeadRecorder publishes: `verify` and `seal` read and check
# heads without them (`verify` has no other use for pika, a tenth of its start-up).

logger = logging.getLogger(__name__)

# The key `make run` gets when CHAIN_SIGNING_KEY_FILE is unset, made next to CHAIN_HEADS_FILE:
# fine for trying the service, never for an election (the warning says so at every start).
DEVELOPMENT_KEY_FILE = "chain-signing-key.dev.pem"
KINDS = ("chain_head", "seal")


def load_signing_key(path: str, *, heads_file: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file `path`; with an empty path, the development key, next to
    `heads_file` (made on first use). Raises ValueError naming the file when it cannot be used."""
    if not path:
        dev = Path(heads_file).parent / DEVELOPMENT_KEY_FILE
        if not dev.exists():
            try:
                _create_key(dev)
            except OSError as exc:
                raise ValueError(f"cannot make a development signing key in {dev.parent} ({exc.strerror})") from None
        logger.warning(
            "CHAIN_SIGNING_KEY_FILE is unset: chain heads are signed with a development key (%s), "
            "which proves nothing to anyone else; make a key per instance for an election "
            "(docs/security.md#signed-heads)",
            dev.resolve(),
        )
        path = str(dev)
    try:
        loaded = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"CHAIN_SIGNING_KEY_FILE {path}: cannot read an Ed25519 private key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"CHAIN_SIGNING_KEY_FILE {path}: not an Ed25519 key")
    return loaded


def _create_key(path: Path) -> None:
    """A new key in `path`, written whole before it appears: instances started together in one
    directory all read the one that was linked first."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_keys(path: str) -> set[str]:
    """Every Ed25519 public key in a PEM file (several blocks may follow each other), as hex."""
    text = Path(path).read_text(encoding="ascii")
    keys: set[str] = set()
    end = "-----END PUBLIC KEY-----"
    for block in text.split(end)[:-1]:
        key = serialization.load_pem_public_key((block.strip() + "\n" + end + "\n").encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: a key that is not Ed25519")
        keys.add(public_hex(key))
    if not keys:
        raise ValueError(f"{path}: no PEM public key in it")
    return keys


def canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(key: Ed25519PrivateKey, record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the signer's public key and the signature added."""
    signed = {**record, "key": public_hex(key)}
    signed["signature"] = key.sign(canonical(signed)).hex()
    return signed


def head_record(link: Link, *, final: bool, instance: str) -> dict[str, Any]:
    return {
        "kind": "chain_head",
        "chain_id": link.chain_id,
        "seq": link.seq,
        "digest": link.digest.hex(),
        "final": final,
        "instance": instance,
        "signed_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }


@dataclass(frozen=True)
class SignedHead:
    chain_id: str
    seq: int
    digest: bytes
    final: bool
    key: str
    signature_ok: bool
    line: int
    source: str = ""

    def __str__(self) -> str:
        return f"{self.chain_id}:{self.seq}:{self.digest.hex()}{' (final)' if self.final else ''}"


def signature_ok(record: dict[str, Any]) -> bool:
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(record["key"]))
        public.verify(bytes.fromhex(record["signature"]), canonical(record))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


def parse_records(lines: Iterable[str], *, source: str) -> list[dict[str, Any]]:
    """The JSON objects of a heads file; ValueError names the first line that is not one."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{source} line {number}: not JSON") from None
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            raise ValueError(f"{source} line {number}: not a chain head or seal record")
        record["_line"] = number
        records.append(record)
    return records


def parse_head(record: dict[str, Any], *, source: str) -> SignedHead:
    number = record.get("_line", 0)
    try:
        head = SignedHead(
            chain_id=str(record["chain_id"]),
            seq=int(record["seq"]),
            digest=bytes.fromhex(record["digest"]),
            final=bool(record["final"]),
            key=str(record.get("key", "")),
            signature_ok=signature_ok({k: v for k, v in record.items() if not k.startswith("_")}),
            line=number,
            source=source,
        )
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{source} line {number}: a chain head needs chain_id, seq, digest and final") from None
    if head.seq < 1 or len(head.digest) != 32 or not head.chain_id:
        raise ValueError(f"{source} line {number}: a chain head needs seq >= 1 and a 32-byte digest")
    return head


def check_heads_file(path: str) -> None:
    """ValueError when CHAIN_HEADS_FILE cannot be appended to: said at start, not at the first head."""
    try:
        with open(path, "a", encoding="ascii"):
            pass
    except OSError as exc:
        raise ValueError(f"CHAIN_HEADS_FILE {path}: cannot append to it ({exc.strerror})") from None


class HeadRecorder:
    """The "chain-heads" thread: signs the heads of this instance's chains, appends them to
    CHAIN_HEADS_FILE and publishes them. It owns its own RabbitMQ connection: the consumer's is
    the connection thread's alone."""

    def __init__(
        self,
        *,
        config: Config,
        chains: Chains,
        instance: str,
        key: Ed25519PrivateKey,
        before_final: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._chains = chains
        self._before_final = before_final
        self._instance = instance
        self._key = key
        self._recorded: dict[str, int] = {}  # chain id -> seq last recorded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chain-heads", daemon=True)
        self._connection: pika.BlockingConnection | None = None
        self._lock = threading.Lock()  # one record at a time: the thread's and the final one

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then record every chain's final head (after the last batch committed)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(self._config.shutdown_timeout_s)
        if self._before_final is not None:
            try:
                self._before_final()
            except Exception as exc:  # the final heads matter more: recorded as the instance knows them
                logger.warning("could not settle the chains' last links before the final heads: %s", exc)
        self.record(final=True)
        if self._connection is not None:
            from amqp import close_quietly

            close_quietly(self._connection.close)
            self._connection = None

    def _run(self) -> None:
        while not self._stop.wait(self._config.chain_heads_interval_s):
            try:
                self.record(final=False)
            except Exception:
                logger.exception("could not record the chain heads; trying again in %.0fs",
                                 self._config.chain_heads_interval_s)  # fmt: skip

    def record(self, *, final: bool) -> int:
        """Sign, append and publish the heads that grew (every head when final). Returns how many."""
        with self._lock:
            links = [link for link in self._chains.links() if final or self._recorded.get(link.chain_id) != link.seq]
            if not links:
                return 0
            lines = [
                json.dumps(sign(self._key, head_record(link, final=final, instance=self._instance)), sort_keys=True)
                for link in links
            ]
            self._append(lines)
            for link in links:
                self._recorded[link.chain_id] = link.seq
            self._publish(lines)
        return len(links)

    def _append(self, lines: list[str]) -> None:
        path = self._config.chain_heads_file
        # One write, flushed to disk: a head the file does not keep vouches for nothing.
        with open(path, "a", encoding="ascii") as out:
            out.write("".join(line + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())

    def _publish(self, lines: list[str]) -> None:
        exchange = self._config.chain_heads_exchange
        if not exchange:
            return
        import pika
        import pika.exceptions

        from amqp import amqp_parameters, close_quietly, describe_error, open_connection

        try:
            if self._connection is None or not self._connection.is_open:
                self._connection = open_connection(amqp_parameters(self._config, name="vote-aggregator chain-heads"))
                channel = self._connection.channel()
                channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
                channel.confirm_delivery()
                self._channel = channel
            for line in lines:
                self._channel.basic_publish(
                    exchange,
                    "",
                    line.encode(),
                    pika.BasicProperties(content_type="application/json", delivery_mode=2),
                )
        except (pika.exceptions.AMQPError, OSError) as exc:
            # The file keeps them; observers miss these until the next record reaches them.
            logger.warning("could not publish chain heads to exchange %s: %s", exchange, describe_error(exc))
            if self._connection is not None:
                close_quietly(self._connection.close)
            self._connection = None
