"""Run a device kit (``tleg_deploy.profile.kit``) on another machine over SSH with the system OpenSSH
client (``ssh``/``scp``), so ``~/.ssh/config``, keys and agents work as they do for the user.

``run_kit_over_ssh``: make a private working directory on the target (``mktemp -d``), copy
``KIT.tar.gz`` there and unpack it, run ``run.sh`` while passing its ``[kit]`` progress lines to a
callback, fetch ``results/`` into the local kit (into a hidden directory first, renamed when
complete) and remove the remote working directory. Ctrl-C (``KeyboardInterrupt``) signals the remote
``run.sh`` (its pid is kept in the working directory; the script stops its runner and removes its
partial results), removes the working directory and leaves no ``results/`` locally.

``profile_over_ssh`` (``profile --ssh``) and ``points_over_ssh`` (``fit --ssh``'s measured steps) make a kit
in a temporary directory, run it there and read it back.

A hand-written client (paramiko, asyncssh) would not read the user's OpenSSH configuration and
agents the same way; the OpenSSH binaries are on every machine that can reach a device by SSH.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tleg_deploy.errors import BackendError, FormatError

if TYPE_CHECKING:
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile.kit import KitConfig
    from tleg_deploy.profile.table import DeviceProfile, Point

_SAFE = re.compile(r"^[A-Za-z0-9._/+-]+$")
CONNECT_TIMEOUT_S = 30
COMMAND_TIMEOUT_S = 120
CONTROL_PERSIST_S = 120  # an orphaned master connection (this process killed) closes after this long idle


@dataclass(frozen=True)
class SshTarget:
    """``user@host`` (or a ``~/.ssh/config`` alias) and an optional port."""

    destination: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> SshTarget:
        """``user@host[:port]``, ``host`` or ``alias``; a bare IPv6 address needs a config alias."""
        dest, sep, port = text.strip().partition(":")
        if not dest or dest.startswith("-") or not re.fullmatch(r"[A-Za-z0-9._@%+-]+", dest):
            raise FormatError(f"cannot read the SSH target {text!r}", hint="write it as user@host or user@host:port")
        if sep:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise FormatError(f"SSH port {port!r} in {text!r} is not a port number", hint="e.g. user@host:2222")
            return cls(dest, int(port))
        return cls(dest)


@dataclass(frozen=True)
class SshRun:
    """Where and how kits run over SSH: the target, an ``ssh -F`` file (None: the user's
    ``~/.ssh/config``) and the target's interpreter for ONNX Runtime kits (None: its ``python3``).
    ``client``: an open ``SshClient`` every kit of this run uses (``connected``); None: each kit
    run connects by itself."""

    target: SshTarget
    config: Path | None = None
    remote_python: str | None = None
    client: SshClient | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return self.target.destination + (f":{self.target.port}" if self.target.port else "")


@contextlib.contextmanager
def connected(run: SshRun | None) -> Iterator[SshRun | None]:
    """``run`` holding one authenticated connection (``SshClient``'s master) for every kit it runs in the
    block: ``fit --ssh`` runs several kits one after another, and each would otherwise connect anew
    (about 0.25 s on loopback, more over a device's Wi-Fi). ``None`` and an already connected run pass
    through unchanged."""
    if run is None or run.client is not None:
        yield run
        return
    with SshClient(run.target, run.config) as client:
        yield dataclasses.replace(run, client=client)


class SshClient:
    """``ssh``/``scp`` invocations for one target, with the user's configuration (or ``config``).

    Used as a context manager it authenticates once: a master connection (``ssh -o ControlMaster=yes
    -N -f``, not ``-M``, which after that option means "ask"; its socket in a private temporary
    directory) that every later ``ssh``/``scp`` of this client reuses, closed
    with ``ssh -O exit`` on leaving (and by itself after ``ControlPersist`` seconds idle should this
    process die first). A kit run makes five connections (mkdir, copy, run, fetch, clean up); on
    loopback each fresh one cost about 0.25 s of handshake, over a device's Wi-Fi more. Where the
    master cannot start (no control sockets on this system) every call connects on its own, as
    without the context manager."""

    def __init__(self, target: SshTarget, config: Path | None = None) -> None:
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise BackendError(f"the OpenSSH client ({tool}) is not installed",
                                   hint="install openssh-client (Debian/Ubuntu: apt-get install openssh-client)")
        self.target = target
        self._common = ["-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"] + (["-F", str(config)] if config else [])
        self._ssh_port = ["-p", str(target.port)] if target.port else []  # scp spells it -P
        self._scp_port = ["-P", str(target.port)] if target.port else []
        self._control: tempfile.TemporaryDirectory[str] | None = None
        self._set_args([])

    def _set_args(self, mux: list[str]) -> None:
        self.ssh_args = ["ssh", *self._common, *mux, *self._ssh_port]
        self.scp_args = ["scp", "-q", *self._common, *mux, *self._scp_port]

    def __enter__(self) -> SshClient:
        self._control = tempfile.TemporaryDirectory(prefix="tleg-ssh.")  # short: a socket path has ~100 bytes
        mux = ["-o", f"ControlPath={self._control.name}/cm", "-o", "ControlMaster=no"]
        master = ["ssh", *self._common, "-o", f"ControlPath={self._control.name}/cm", "-o", "ControlMaster=yes",
                  "-o", f"ControlPersist={CONTROL_PERSIST_S}", "-N", "-f", *self._ssh_port,
                  self.target.destination]
        try:  # no pipes: the backgrounded master would hold them open
            started = subprocess.run(master, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, timeout=CONNECT_TIMEOUT_S + 15, check=False)
        except subprocess.TimeoutExpired:
            started = None
        if started is not None and started.returncode == 0 and Path(self._control.name, "cm").exists():
            self._set_args(mux)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._control is None:
            return
        if Path(self._control.name, "cm").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([*self.ssh_args, "-O", "exit", self.target.destination], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=15, check=False)
        self._set_args([])
        with contextlib.suppress(OSError):
            self._control.cleanup()
        self._control = None

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        proc = subprocess.run([*self.ssh_args, self.target.destination, command], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BackendError(f"ssh {self.target.destination} failed (exit {proc.returncode}): {_last(proc.stderr)}",
                               hint="check that `ssh HOST true` works without a prompt (keys, ~/.ssh/config)")
        return proc.stdout

    def copy(self, sources: Sequence[str], dest: str, *, recursive: bool = False, timeout: float = 3600) -> None:
        args = [*self.scp_args, *(["-r"] if recursive else []), *sources, dest]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BackendError(f"scp to/from {self.target.destination} failed: {_last(proc.stderr)}")

    def remote(self, path: str) -> str:
        return f"{self.target.destination}:{path}"


def run_kit_over_ssh(kit_dir: Path, target: SshTarget, *, config: Path | None = None,
                     remote_python: str | None = None, progress: Callable[[str], None] | None = None,
                     client: SshClient | None = None) -> Path:
    """Run the kit at ``kit_dir`` (with ``kit_dir.tar.gz`` beside it) on ``target``; returns
    ``kit_dir/results`` once fetched. ``client``: an open connection to ``target`` to use (None: connect
    for this run and close the connection after it)."""
    say = progress or (lambda line: None)
    kit_dir = Path(kit_dir)
    tarball = kit_dir.with_name(kit_dir.name + ".tar.gz")
    if not _SAFE.match(kit_dir.name) or not tarball.is_file():
        raise FormatError(f"{kit_dir} is not a kit with its .tar.gz beside it", hint="make it with tleg-deploy kit")
    if (kit_dir / "results").exists():
        raise FormatError(f"{kit_dir}/results already exists", hint="import it with --from-kit, or make a new kit")
    if client is not None:
        return _run_kit(client, kit_dir, tarball, remote_python, say)
    say(f"connecting to {target.destination}")
    with SshClient(target, config) as own:
        return _run_kit(own, kit_dir, tarball, remote_python, say)


def _run_kit(client: SshClient, kit_dir: Path, tarball: Path, remote_python: str | None,
             say: Callable[[str], None]) -> Path:
    target = client.target
    workdir = client.run('mkdir -p "${TMPDIR:-/tmp}" && mktemp -d "${TMPDIR:-/tmp}/tleg-kit.XXXXXX"').strip()
    if not workdir.startswith("/") or not _SAFE.match(workdir):
        raise BackendError(f"the target made an unexpected working directory {workdir!r}")
    try:
        say(f"copying {tarball.name} ({tarball.stat().st_size / 1e6:.1f} MB) to {target.destination}:{workdir}")
        client.copy([str(tarball)], client.remote(f"{workdir}/kit.tar.gz"))
        _run_remote(client, workdir, kit_dir.name, remote_python, say)
        say("fetching results")
        with tempfile.TemporaryDirectory(prefix=".results.", dir=kit_dir) as tmp:
            client.copy([client.remote(f"{workdir}/{kit_dir.name}/results")], tmp, recursive=True)
            (Path(tmp) / "results").rename(kit_dir / "results")
    finally:
        with contextlib.suppress(BackendError, subprocess.SubprocessError, OSError):
            client.run(f"rm -rf {shlex.quote(workdir)}", timeout=60)
    return kit_dir / "results"


def _run_remote(client: SshClient, workdir: str, name: str, remote_python: str | None,
                say: Callable[[str], None]) -> None:
    wd = shlex.quote(workdir)
    env = f"KIT_PYTHON={shlex.quote(remote_python)} " if remote_python else ""
    # `exec` keeps the shell's pid for run.sh, so a later `kill` reaches it (and its trap stops the runner).
    command = f"cd {wd} && tar xzf kit.tar.gz && echo $$ > run.pid && exec env {env}sh {shlex.quote(name)}/run.sh"
    proc = subprocess.Popen([*client.ssh_args, client.target.destination, command], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                            start_new_session=True)  # Ctrl-C reaches us, not ssh: we stop the remote run
    lines: list[str] = []
    try:
        for line in proc.stdout or ():
            line = line.rstrip()
            lines.append(line)
            if line:
                say(line)
        code = proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(BackendError, subprocess.SubprocessError, OSError):
            client.run(f'kill -TERM "$(cat {wd}/run.pid)"', timeout=30)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        raise
    if code != 0:
        errors = [ln for ln in lines if "error" in ln or "missing" in ln] or lines or ["(no output)"]
        raise BackendError(f"the kit failed on {client.target.destination} (exit {code}): {errors[-1]}")


def _last(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]


@contextlib.contextmanager
def _ran_kit(spec: ViTSpec, cfg: KitConfig, run: SshRun, learngene: Any,
             progress: Callable[[str], None] | None) -> Iterator[Path]:
    """A kit for ``cfg`` made in a temporary directory and run on ``run.target``; yields its directory
    (with ``results/``), removed afterwards."""
    from tleg_deploy.profile.kit import build_kit

    say = progress or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="tleg-kit.") as tmp:
        say(f"making the {cfg.measure.backend} kit (depths {', '.join(map(str, cfg.measure.depths))}, "
            f"{', '.join(cfg.measure.precisions)})")
        kit_dir = build_kit(spec, cfg, Path(tmp) / f"kit-{cfg.device}", learngene=learngene)
        run_kit_over_ssh(kit_dir, run.target, config=run.config, remote_python=run.remote_python, progress=say,
                         client=run.client)
        yield kit_dir


def profile_over_ssh(spec: ViTSpec, cfg: KitConfig, run: SshRun, *, learngene: Any = None,
                     progress: Callable[[str], None] | None = None) -> DeviceProfile:
    """The measured profile (named ``cfg.device``) of a kit run on the target (``profile --ssh``)."""
    from tleg_deploy.profile.kit_import import import_kit

    with _ran_kit(spec, cfg, run, learngene, progress) as kit_dir:
        return import_kit(kit_dir, name=cfg.device)


def points_over_ssh(spec: ViTSpec, cfg: KitConfig, run: SshRun, *, learngene: Any = None,
                    progress: Callable[[str], None] | None = None
                    ) -> tuple[dict[str, Any], dict[tuple[str, int], Point]]:
    """``kit.json`` and the measured points per (precision, depth) of a kit run on the target, checked as an
    import checks them (``kit_import.kit_points``): what ``fit --ssh`` steps on."""
    from tleg_deploy.profile.kit_import import kit_points

    with _ran_kit(spec, cfg, run, learngene, progress) as kit_dir:
        return kit_points(kit_dir)
