"""Starts the real feature store server (the binary the Rust workspace builds) on a free
loopback port in a temporary directory, for the whole test session."""

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


@pytest.fixture(scope="session")
def server_address(tmp_path_factory):
    directory = tmp_path_factory.mktemp("featurestore")
    process = subprocess.Popen(
        [
            str(server_binary()),
            "--auth-disabled",
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
    yield address
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture
def client(server_address):
    with Client(server_address, timeout=10.0) as client:
        yield client
