"""Joining a Ray cluster that uses token authentication (ray-project/ray#64755): after a local run wrote
``~/.ray/auth_token``, ``ray start --head`` turns authentication on, and ``RAY_ADDRESS=HOST:PORT`` drivers on
that machine must send the token, or say what to set when they cannot join."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

pytest.importorskip("ray", reason="needs the scale extra: pip install -e '.[scale]'")

# A driver whose ray.init only reports the authentication mode it would join with, then fails as Ray does
# when the cluster refuses it; RAY_ADDRESS points at a port that accepts connections.
DRIVER = textwrap.dedent(
    """
    import os, socket
    import ray
    from data_prep import ray_engine
    from data_prep.check import ConversionError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{listener.getsockname()[1]}"

    def init(**kw):
        print("RAY_AUTH_MODE=" + str(os.environ.get("RAY_AUTH_MODE")))
        raise ConnectionError(f"Failed to connect to Ray cluster at {os.environ['RAY_ADDRESS']}")

    ray.init = init
    try:
        ray_engine.connect(5)
    except ConversionError as e:
        print("error: " + str(e))
    """
)


def run_driver(home, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER],
        env={**clean, "HOME": str(home), "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_token_on_this_machine_is_sent_as_the_head_would(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 32)
    mode, error = run_driver(tmp_path)
    assert mode == "RAY_AUTH_MODE=token"
    assert error.endswith("the token found (RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or "
                          "~/.ray/auth_token) must be the cluster's")  # fmt: skip


def test_without_a_token_the_failure_names_what_to_set(tmp_path):
    mode, error = run_driver(tmp_path)
    assert mode == "RAY_AUTH_MODE=None"
    assert error.startswith("error: cannot start or join the Ray cluster at 127.0.0.1:")
    assert "Failed to connect to Ray cluster" in error
    assert "set RAY_AUTH_MODE=token and give this machine the cluster's token (RAY_AUTH_TOKEN" in error
