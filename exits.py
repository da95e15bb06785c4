"""Exit codes: the same for every command, for the same causes (docs/operations.md#exit-codes)."""

from __future__ import annotations

# Done: the service stopped cleanly, a command did what it was asked.
OK = 0
# Not done, and trying again later may succeed: a server unreachable, votes left unwritten for
# RabbitMQ to redeliver, messages not confirmed, problems found by --check, nothing found.
FAILURE = 1
# A configuration or usage error that retrying cannot fix: a bad variable or argument, credentials
# or a certificate refused, the database missing, the metrics port taken. systemd does not restart on it.
CONFIG = 2
# Interrupted by Ctrl-C (SIGINT) before finishing (a one-shot command; the service drains and exits 0 or 1).
INTERRUPTED = 130
