"""Facts about the machine and the processes under test.

Owns: the machine description written into every result (CPU, cores, Python,
kernel), reading a process's resident memory from /proc, raising the
open-file limit so that thousands of sockets fit, and picking free loopback
ports. Nothing here measures anything by itself.
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }


def status_kb(pid: int, field: str = "VmRSS") -> int:
    """A `kB` field of /proc/PID/status (VmRSS: resident memory now; VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"/proc/{pid}/status has no {field}")


def rss_kb(pid: int) -> int:
    return status_kb(pid, "VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit(wanted: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE and return the soft limit now in force.

    The soft limit goes up to the hard limit; when `wanted` is more than the hard
    limit, raising the hard limit too is tried (it works for root). Child
    processes inherit the result, which is how the streamvisor under test gets it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted is not None and hard != resource.RLIM_INFINITY and wanted > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_seconds() -> float:
    """CPU time all processes of the machine have used (user, nice and system, on
    every core), from /proc/stat. Interrupt and softirq time (the kernel's own
    loopback work for our traffic) and steal are left out: no process is
    charged with them either."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return (user + nice + system) / _CLK_TCK


def source_state(root: Path) -> dict[str, Any]:
    """Which streamvisor is measured: the git commit, the files changed since it,
    and a digest of the sources (core, plugins, hooks, config, plugins.toml), so
    that a run can tell whether the code changed under it."""
    import hashlib
    import subprocess

    def git(*args: str) -> str:
        try:
            # rstrip: `status --porcelain` lines begin with a space (" M core/app.py").
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    digest = hashlib.sha256()
    for folder in ("core", "plugins", "hooks", "config"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    for name in ("plugins.toml", "pyproject.toml"):
        if (root / name).exists():
            digest.update((root / name).read_bytes())
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "core", "plugins", "hooks", "config", "plugins.toml", "pyproject.toml").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty, "digest": digest.hexdigest()[:16]}
