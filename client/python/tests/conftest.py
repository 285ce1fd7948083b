"""Starts the real feature store server (the binary the Rust workspace builds) on a free
loopback port in a temporary directory, for the whole test session."""

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from featurestore import Client

REPOSITORY = Path(__file__).resolve().parents[3]


def server_binary() -> Path:
    binary = Path(
        os.environ.get(
            "FEATURESTORE_SERVER_BIN", REPOSITORY / "target" / "debug" / "featurestore-server"
        )
    )
    if not binary.is_file():
        pytest.fail(
            f"no server binary at {binary}: build it with "
            "`cargo build -p featurestore-server` or set FEATURESTORE_SERVER_BIN",
            pytrace=False,
        )
    return binary


def start_server(directory: Path, *arguments: str):
    """Starts the server in `directory` with `arguments`; returns the process, its address
    and its log lines so far (kept up to date by a thread)."""
    process = subprocess.Popen(
        [
            str(server_binary()),
            "--listen-address",
            "127.0.0.1:0",
            "--metrics-listen-address",
            "127.0.0.1:0",
            "--data-dir",
            str(directory / "db"),
            "--durability",
            "buffered",
            "--log-format",
            "json",
            *arguments,
        ],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "RUST_LOG": "info"},
        text=True,
    )
    log = []
    address = None
    deadline = time.monotonic() + 120
    for line in process.stderr:
        log.append(line)
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("message") == "serving":
            address = event["address"]
            break
        if time.monotonic() > deadline:
            break
    if address is None:
        process.kill()
        pytest.fail("the server did not start:\n" + "".join(log), pytrace=False)
    # Keep reading its log, so that the pipe never fills.
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    return process, address, log


def stop_server(process) -> None:
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="session")
def server_address(tmp_path_factory):
    """A development server: authentication disabled."""
    process, address, _ = start_server(tmp_path_factory.mktemp("open"), "--auth-disabled")
    yield address
    stop_server(process)


@pytest.fixture
def client(server_address):
    with Client(server_address, timeout=10.0) as client:
        yield client


def make_certificates(directory: Path) -> dict:
    """A certificate authority, a server certificate for 127.0.0.1 and localhost, and a
    client certificate named `operators.test`, made with the openssl command; returns the
    PEM files' paths."""

    def openssl(*arguments):
        subprocess.run(["openssl", *arguments], cwd=directory, check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=featurestore test CA", "-days", "2")
    for name, subject, extensions in [
        ("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "/CN=operators.test", "extendedKeyUsage=clientAuth\n"),
    ]:
        (directory / f"{name}.ext").write_text(extensions)
        openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        )
    return {name: directory / name for name in ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"]}


#: The bearer token of the `operators` principal of `secured_server`.
OPERATOR_TOKEN = "python-client-test-token-5d1f0a"


@pytest.fixture(scope="session")
def secured_server(tmp_path_factory):
    """A server on TLS requiring authentication (client/testdata/secured-server.toml):
    `operators` authenticates with its bearer token or its client certificate. Yields its
    address and the certificate files."""
    directory = tmp_path_factory.mktemp("secured")
    files = make_certificates(directory)
    template = (REPOSITORY / "client" / "testdata" / "secured-server.toml").read_text()
    config = template.replace(
        "TOKEN_SHA256", hashlib.sha256(OPERATOR_TOKEN.encode()).hexdigest()
    ).replace("CERTIFICATES", str(directory))
    (directory / "featurestore.toml").write_text(config)
    process, address, _ = start_server(directory, "--config", str(directory / "featurestore.toml"))
    yield address, files
    stop_server(process)
