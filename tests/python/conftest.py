"""Starts a simulator and a gateway (the real `tollgate` binary) for the SDK tests."""

import shutil
import hashlib
import os
import pathlib
import socket
import subprocess
import threading

import pytest

BIN = os.environ.get("TOLLGATE_BIN", "target/debug/tollgate")
KEY = "tg-canary-python-3c2b1a09f8e7"
ADMIN_TOKEN = "tg-canary-admin-7f6e5d4c3b2a"
LIMITED_KEY = "tg-canary-python-limited-4d3c2b1a"
UPSTREAM_KEY = "sk-canary-upstream-python-0a1b2c3d"


def free_port():
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class Proc:
    """A tollgate child process; its address comes from its `listening on` line."""

    def __init__(self, args, log, env=None):
        self.log = log
        self.p = subprocess.Popen(
            [BIN, *args],
            stdout=subprocess.PIPE,
            stderr=open(log, "wb"),
            env={**os.environ, **(env or {}), "TOLLGATE_LOG": "info"},
            text=True,
        )
        self.query = self.pg = None
        for line in self.p.stdout:
            if line.startswith("query API on http://"):
                self.query = line.strip().split("http://")[1]
            if line.startswith("PostgreSQL wire on "):
                self.pg = line.strip().split(" on ")[1]
            if "listening on http://" in line:
                self.addr = line.strip().split("listening on http://")[1]
                break
        else:
            raise RuntimeError(f"{args} exited early: {pathlib.Path(log).read_text()}")
        # Keep reading stdout so the child never blocks on a full pipe.
        threading.Thread(target=self.p.stdout.read, daemon=True).start()

    def stop(self):
        self.p.kill()
        self.p.wait()


def simulators(directory):
    """The three upstreams every gateway here routes to: an R1-like one
    (DeepSeek usage shape, reasoning tokens), a QwQ-like one, and one that
    always answers 503."""
    env = {"TOLLGATE_SIM_API_KEY": UPSTREAM_KEY}
    r1 = Proc(["simulate", "--listen", "127.0.0.1:0", "--output-tokens", "16", "--reasoning-tokens", "6",
               "--usage-style", "deepseek"], directory / "sim-r1.log", env)
    qwq = Proc(["simulate", "--listen", "127.0.0.1:0", "--output-tokens", "12"], directory / "sim-qwq.log", env)
    down = Proc(["simulate", "--listen", "127.0.0.1:0", "--error-rate", "1", "--error-status", "503"],
                directory / "sim-down.log", env)
    return r1, qwq, down


def upstream(name, addr):
    return (f'[upstreams.{name}]\nkind = "openai"\nbase_url = "http://{addr}/v1"\n'
            f'api_key = "${{UPSTREAM_KEY}}"\n\n')


def routes_and_consumers(extra_routes=""):
    """R1 falling back to QwQ, a route that always fails over to QwQ, QwQ
    itself, `extra_routes`, and the two consumers."""
    return f"""[[routes]]
model = "deepseek-r1"
targets = [{{ upstream = "r1", model = "deepseek-reasoner" }}]
fallback = ["qwq-32b"]

[[routes]]
model = "flaky-r1"
targets = [{{ upstream = "down", model = "deepseek-reasoner" }}]
fallback = ["qwq-32b"]

[[routes]]
model = "qwq-32b"
targets = [{{ upstream = "qwq" }}]

{extra_routes}[[consumers]]
name = "python-app"
api_keys = ["{sha(KEY)}"]

[[consumers]]
name = "qwq-only"
api_keys = ["{sha(LIMITED_KEY)}"]
models = ["qwq-*"]
"""


@pytest.fixture(scope="session")
def artifacts():
    d = pathlib.Path(os.environ.get("TOLLGATE_ARTIFACTS", "target/tmp/e2e/python"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def gateway(artifacts):
    r1, qwq, down = simulators(artifacts)
    lake = artifacts / "lake"
    shutil.rmtree(lake, ignore_errors=True)
    shutil.rmtree(artifacts / "spool", ignore_errors=True)

    config = f"""
[gateway]
listen = "127.0.0.1:0"

[pipeline]
spool_dir = "{artifacts / "spool"}"
lake = "{lake}"
flush_ms = 100

[query]
listen = "127.0.0.1:0"
pg_listen = "127.0.0.1:0"
admin_token = "${{TOLLGATE_ADMIN_TOKEN}}"
max_concurrent = 4
max_rss_mb = 1536
cors_origins = ["http://grafana.example:3000"]

{upstream("r1", r1.addr)}{upstream("qwq", qwq.addr)}{upstream("down", down.addr)}
{routes_and_consumers()}"""
    path = artifacts / "tollgate.toml"
    path.write_text(config)
    gw = Proc(["serve", "--config", str(path)], artifacts / "gateway.log", {"UPSTREAM_KEY": UPSTREAM_KEY, "TOLLGATE_ADMIN_TOKEN": ADMIN_TOKEN})
    gw.lake = lake
    yield gw
    for p in (gw, r1, qwq, down):
        p.stop()


@pytest.fixture
def rig(artifacts, request):
    """A fresh directory for one test (under its module's name, e.g.
    `limits/`), and a list of processes stopped when the test ends."""
    module = request.module.__name__.removeprefix("test_")
    d = artifacts / module / "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    procs = []
    yield d, procs
    for p in procs:
        try:
            p.stop()
        except Exception:
            pass
