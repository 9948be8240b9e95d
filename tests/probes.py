"""Small probes the suite shares: a free loopback port, and what a fresh interpreter imports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def modules_imported_by(statement: str) -> set[str]:
    """Every module in ``sys.modules`` after a fresh interpreter runs ``statement`` (an import):
    what a Ray worker process that unpickles something of those modules loads."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))
