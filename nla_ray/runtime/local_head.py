"""Helpers for a Ray head of one's own on this machine (tests, fault injection): free loopback ports,
and stopping exactly the processes that carry a marker (a session or temp dir) on their command line.
`ray stop` would kill every Ray process on the machine, a user's own cluster included."""

from __future__ import annotations

import contextlib
import socket


def free_ports(n: int) -> list[str]:
    """n distinct loopback ports free right now (bound together, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def stop_processes_with(marker: str, timeout: float = 20) -> int:
    """Terminate (then kill) every process whose command line holds `marker`, with its children.
    Returns how many processes were stopped."""
    import psutil

    ours = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any(marker in a for a in (p.info["cmdline"] or [])):
                ours.append(p)
    family = {p.pid: p for p in ours}
    for p in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.update({c.pid: c for c in p.children(recursive=True)})
    for p in family.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(list(family.values()), timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return len(family)
