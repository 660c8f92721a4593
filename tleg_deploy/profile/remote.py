"""Run a device kit (``tleg_deploy.profile.kit``) on another machine over SSH with the system OpenSSH
client (``ssh``/``scp``), so ``~/.ssh/config``, keys and agents work as they do for the user.

``RemoteKit``: make a private working directory on the target (``mktemp -d``), copy ``KIT.tar.gz``
there and unpack it; each ``run`` runs ``run.sh`` while passing its ``[kit]`` progress lines to a
callback and fetches ``results/`` into the local kit (into a hidden directory first, renamed when
complete); leaving it removes the remote working directory. Ctrl-C (``KeyboardInterrupt``) signals the
remote ``run.sh`` (its pid is kept in the working directory; the script stops its runner and removes
its partial results), removes the working directory and leaves the local ``results/`` as they were.

``kit_on_target`` makes a kit in a temporary directory and puts it on the target: ``profile_over_ssh``
(``profile --ssh``) runs it once and imports it; ``fit --ssh``'s measured steps
(``deploy.fit_measure.ssh_timer``) run a kit again to time a depth afresh.

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
    from tleg_deploy.profile.table import DeviceProfile

_SAFE = re.compile(r"^[A-Za-z0-9._/+-]+$")
CONNECT_TIMEOUT_S = 30
COMMAND_TIMEOUT_S = 120
UNPACK_TIMEOUT_S = 600  # a large kit on a device's SD card
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

    def __str__(self) -> str:
        return self.destination + (f":{self.port}" if self.port else "")


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
        return str(self.target)


@contextlib.contextmanager
def connected(run: SshRun | None, say: Callable[[str], None] | None = None) -> Iterator[SshRun | None]:
    """``run`` holding one authenticated connection (``SshClient``'s master) for every kit it runs in the
    block: ``fit --ssh`` runs several kits one after another, and each would otherwise connect anew
    (about 0.25 s on loopback, more over a device's Wi-Fi). ``None`` and an already connected run pass
    through unchanged."""
    if run is None:
        yield None
        return
    with _client(run, say) as client:
        yield run if client is run.client else dataclasses.replace(run, client=client)


@contextlib.contextmanager
def _client(run: SshRun, say: Callable[[str], None] | None) -> Iterator[SshClient]:
    """``run``'s open client, or a new one for the block (said: it waits up to the connect timeout when the target
    does not answer)."""
    if run.client is not None:
        yield run.client
        return
    if say is not None:
        say(f"connecting to {run.target} ...")
    with SshClient(run.target, run.config) as client:
        yield client


class SshClient:
    """``ssh``/``scp`` invocations for one target, with the user's configuration (or ``config``).

    Used as a context manager it authenticates once: a master connection (``ssh -o ControlMaster=yes
    -N -f``, not ``-M``, which after that option means "ask"; its socket in a private temporary
    directory) that every later ``ssh``/``scp`` of this client reuses, closed
    with ``ssh -O exit`` on leaving (and by itself after ``ControlPersist`` seconds idle should this
    process die first). A kit run makes five connections (mkdir, copy, run, fetch, clean up); on
    loopback each fresh one cost about 0.25 s of handshake, over a device's Wi-Fi more. Where the
    master cannot start, one plain ``ssh HOST true`` says why (refused, unreachable, a password prompt) before
    anything is built for the target; where that works (no control sockets on this system) every call connects
    on its own, as without the context manager."""

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
        # No master: the target refused, did not answer or asked for a password, or this system has no control
        # sockets. One plain connection tells which, before the caller builds a kit for a target it cannot reach.
        try:
            self.run("true", timeout=CONNECT_TIMEOUT_S + 15)
        except BaseException as e:
            self.__exit__(None, None, None)
            if isinstance(e, subprocess.TimeoutExpired):
                raise BackendError(f"ssh {self.target} did not answer within {CONNECT_TIMEOUT_S + 15} s",
                                   hint="check that `ssh HOST true` works without a prompt") from None
            raise
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
            raise BackendError(f"ssh {self.target} failed (exit {proc.returncode}): {_last(proc.stderr)}",
                               hint="check that `ssh HOST true` works without a prompt (keys, ~/.ssh/config)")
        return proc.stdout

    def copy(self, sources: Sequence[str], dest: str, *, recursive: bool = False, timeout: float = 3600) -> None:
        args = [*self.scp_args, *(["-r"] if recursive else []), *sources, dest]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BackendError(f"scp to/from {self.target} failed: {_last(proc.stderr)}")

    def remote(self, path: str) -> str:
        return f"{self.target.destination}:{path}"


class RemoteKit:
    """A kit (``kit_dir`` with ``kit_dir.tar.gz`` beside it) copied to the target and unpacked there once, in a
    private working directory (``mktemp -d``), then run as often as asked: each ``run`` is a fresh session of
    ``run.sh`` whose ``results/`` replace the local ones. ``fit --ssh`` times a depth read near the budget again
    by running the kit that measured it again: no new export, no new copy, and a TensorRT kit loads the engines
    its first run built (``KIT_REUSE_ENGINES=1``) instead of building them again. As a context manager it
    removes the remote working directory on leaving (Ctrl-C included)."""

    def __init__(self, client: SshClient, kit_dir: Path, remote_python: str | None,
                 say: Callable[[str], None]) -> None:
        self.client, self.kit_dir, self.remote_python, self.say = client, Path(kit_dir), remote_python, say
        self.tarball = _kit_tarball(self.kit_dir)
        self.workdir: str | None = None
        self.runs = 0

    def __enter__(self) -> RemoteKit:
        client = self.client
        workdir = client.run('mkdir -p "${TMPDIR:-/tmp}" && mktemp -d "${TMPDIR:-/tmp}/tleg-kit.XXXXXX"').strip()
        if not workdir.startswith("/") or not _SAFE.match(workdir):
            raise BackendError(f"the target made an unexpected working directory {workdir!r}")
        self.workdir = workdir
        try:
            self.say(f"copying {self.tarball.name} ({self.tarball.stat().st_size / 1e6:.1f} MB) to "
                     f"{client.target.destination}:{workdir}")
            client.copy([str(self.tarball)], client.remote(f"{workdir}/kit.tar.gz"))
            client.run(f"cd {shlex.quote(workdir)} && tar xzf kit.tar.gz", timeout=UNPACK_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self) -> Path:
        """Run the kit once more on the target; returns the local ``results/``, replaced by this run's (the first
        run refuses results it did not fetch itself). Ctrl-C stops the remote run and leaves the local results
        as they were."""
        if self.workdir is None:
            raise BackendError("the kit is not on the target (use RemoteKit as a context manager)")
        results = self.kit_dir / "results"
        if self.runs == 0 and results.exists():
            raise FormatError(f"{results} already exists", hint="import it with --from-kit, or make a new kit")
        _run_remote(self.client, self.workdir, self.kit_dir.name, self.remote_python, self.say,
                    reuse_engines=self.runs > 0)
        self.say("fetching results")
        with tempfile.TemporaryDirectory(prefix=".results.", dir=self.kit_dir) as tmp:
            self.client.copy([self.client.remote(f"{self.workdir}/{self.kit_dir.name}/results")], tmp,
                             recursive=True)
            if results.exists():  # the previous run's, fetched by this object
                shutil.rmtree(results)
            (Path(tmp) / "results").rename(results)
        self.runs += 1
        return results

    def close(self) -> None:
        """Remove the remote working directory (best effort: the target may be gone)."""
        if self.workdir is None:
            return
        with contextlib.suppress(BackendError, subprocess.SubprocessError, OSError):
            self.client.run(f"rm -rf {shlex.quote(self.workdir)}", timeout=60)
        self.workdir = None


def _kit_tarball(kit_dir: Path) -> Path:
    """``kit_dir.tar.gz``, refused unless it exists beside a kit directory with a plain name."""
    tarball = kit_dir.with_name(kit_dir.name + ".tar.gz")
    if not _SAFE.match(kit_dir.name) or not tarball.is_file():
        raise FormatError(f"{kit_dir} is not a kit with its .tar.gz beside it", hint="make it with tleg-deploy kit")
    return tarball


def _run_remote(client: SshClient, workdir: str, name: str, remote_python: str | None,
                say: Callable[[str], None], *, reuse_engines: bool = False) -> None:
    wd = shlex.quote(workdir)
    env = f"KIT_PYTHON={shlex.quote(remote_python)} " if remote_python else ""
    env += "KIT_REUSE_ENGINES=1 " if reuse_engines else ""
    # `exec` keeps the shell's pid for run.sh, so a later `kill` reaches it (and its trap stops the runner).
    command = f"cd {wd} && echo $$ > run.pid && exec env {env}sh {shlex.quote(name)}/run.sh"
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
        raise BackendError(f"the kit failed on {client.target} (exit {code}): {errors[-1]}")


def _last(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]


@contextlib.contextmanager
def kit_on_target(spec: ViTSpec, cfg: KitConfig, run: SshRun, *, learngene: Any = None,
                  progress: Callable[[str], None] | None = None) -> Iterator[RemoteKit]:
    """A kit for ``cfg`` made in a temporary directory and unpacked on ``run.target`` (``RemoteKit``, not run
    yet); both copies are removed on leaving. Without ``run.client`` it connects for the block."""
    from tleg_deploy.profile.kit import build_kit

    say = progress or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="tleg-kit.") as tmp, _client(run, say) as client:
        say(f"making the {cfg.measure.backend} kit (depths {', '.join(map(str, cfg.measure.depths))}, "
            f"{', '.join(cfg.measure.precisions)})")
        kit_dir = build_kit(spec, cfg, Path(tmp) / f"kit-{cfg.device}", learngene=learngene)
        with RemoteKit(client, kit_dir, run.remote_python, say) as kit:
            yield kit


def profile_over_ssh(spec: ViTSpec, cfg: KitConfig, run: SshRun, *, learngene: Any = None,
                     progress: Callable[[str], None] | None = None) -> DeviceProfile:
    """The measured profile (named ``cfg.device``) of a kit run once on the target (``profile --ssh``)."""
    from tleg_deploy.profile.kit_import import import_kit

    with kit_on_target(spec, cfg, run, learngene=learngene, progress=progress) as kit:
        kit.run()
        return import_kit(kit.kit_dir, name=cfg.device)
