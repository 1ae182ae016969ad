"""``imgmig serve``: a real uvicorn process answering over TCP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from services import api_keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll /healthz until the server answers (or the process dies)."""
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(f"imgmig serve exited: {log.read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("imgmig serve did not become ready")


def test_imgmig_serve_answers_with_key_checks(migrated_url: str, tmp_path: Path) -> None:
    """imgmig serve answers over TCP: own tenant 200, other tenant 403, OpenAPI served."""
    with psycopg.connect(migrated_url) as conn:
        key = api_keys.create_key(conn, "user_1")
    port = _free_port()
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", migrated_url,
           "serve", "--port", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out, subprocess.Popen(cmd, stdout=out, stderr=out) as proc:
        try:
            _serve_checks(base, key, proc, log)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _serve_checks(base: str, key: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Ready, then: the key's tenant is served, another tenant is 403, OpenAPI is up."""
    _wait_ready(base, proc, log)
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=10) as client:
        listed = client.get("/v1/tenants/user_1/products/1/images")
        assert listed.status_code == 200
        assert listed.json()["stage"] == "jsonb"
        assert len(listed.json()["images"]) >= 2
        assert client.get("/v1/tenants/user_2/products/1/images").status_code == 403
        assert (
            "/v1/tenants/{tenant}/products/{product_id}/images"
            in client.get("/openapi.json").json()["paths"]
        )
