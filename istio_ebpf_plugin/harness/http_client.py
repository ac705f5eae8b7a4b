"""HTTP client run in a pod as the app user: ``python3 -S http_client.py URL COUNT TIMEOUT``.

GETs URL COUNT times; prints one JSON list, one entry per request: status, bytes and
``info`` (the server's JSON first line, see http_server.py) or an error. Stdlib only.
"""

from __future__ import annotations

import json
import sys
import urllib.request


def fetch(url: str, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
            try:
                info = json.loads(body.split(b"\n", 1)[0])
            except ValueError:
                info = None
            return {"status": r.status, "bytes": len(body), "info": info}
    except Exception as exc:
        return {"status": getattr(exc, "code", 0), "error": f"{type(exc).__name__}: {exc}"}


def main(url: str, count: int, timeout: float) -> None:
    print(json.dumps([fetch(url, timeout) for _ in range(count)]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
