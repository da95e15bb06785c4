"""Serve a directory read-only over HTTP: the compose stack's docs server, which the alerts'
runbook_url links point at (docs/monitoring.md#runbook-links).

    python serve_docs.py --directory /srv --bind 0.0.0.0 --port 8088

Standard library only, so that it runs in the plain Python image. GET and HEAD only (what
SimpleHTTPRequestHandler answers). Markdown goes out as text/plain: a browser shows the file,
unrendered, and jumps to no anchor, rather than downloading it (Python knows no type for .md
unless the system's mime.types does).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os


class DocsHandler(http.server.SimpleHTTPRequestHandler):
    def guess_type(self, path: str | os.PathLike[str]) -> str:
        if os.fspath(path).lower().endswith(".md"):
            return "text/plain; charset=utf-8"
        return super().guess_type(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directory", required=True, help="the directory to serve")
    parser.add_argument("--bind", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=8088)
    args = parser.parse_args(argv)
    handler = functools.partial(DocsHandler, directory=args.directory)
    with http.server.ThreadingHTTPServer((args.bind, args.port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
