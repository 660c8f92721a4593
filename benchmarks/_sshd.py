"""A private OpenSSH server on 127.0.0.1 for tests and benchmarks of ``--ssh`` (Debian's ``openssh-server``;
``make sshd`` installs it best effort): a high free port, a throw-away host key, client key and client config,
stopped by its pid file. Only the loopback address is ever contacted."""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    """A loopback port nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sshd_missing(script: str) -> bool:
    """Whether ``SSHD`` is missing (then a benchmark says it skipped, and why, and writes nothing)."""
    if SSHD.exists():
        return False
    print(f"{script}: skipped: {SSHD} is not installed (make sshd installs openssh-server)", file=sys.stderr)
    return True


@contextlib.contextmanager
def loopback_sshd(workdir: Path) -> Iterator[tuple[str, Path]]:
    """``(user@127.0.0.1:port, ssh config file)`` of an sshd whose keys, configuration and log (``sshd.log``)
    live in ``workdir``; stopped on leaving. Raises ``FileNotFoundError`` where ``SSHD`` is not installed."""
    if not SSHD.exists():
        raise FileNotFoundError(f"{SSHD} is not installed (make sshd installs openssh-server)")
    d = Path(workdir)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=60)
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'client_key.pub'}\n"
        f"PidFile {d / 'sshd.pid'}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
    (d / "ssh_config").write_text(
        f"Host *\n  IdentityFile {d / 'client_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        f"  StrictHostKeyChecking no\n  UserKnownHostsFile {d / 'known_hosts'}\n  LogLevel ERROR\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    subprocess.run([str(SSHD), "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], check=True, timeout=30)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"{getpass.getuser()}@127.0.0.1:{port}", d / "ssh_config"
    finally:
        pid_file = d / "sshd.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
