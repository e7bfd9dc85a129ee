"""DS_REDIS_URL forms that production uses: a password, and TLS (rediss://) verified against a CA.

Both run a private redis-server on a free port (the shared one on 6379 has neither).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deepseek_serve.cache import build_cache_layer
from deepseek_serve.config import load_settings
from deepseek_serve.contracts import Principal
from tests.support.cache import PrivateRedis, unique_prefix


async def exercise(url: str) -> bool:
    """True when the limiter and the cache really went through Redis."""
    layer = build_cache_layer(
        load_settings(
            _env_file=None, redis_url=url, redis_key_prefix=unique_prefix(), redis_timeout_s=2.0, default_rpm=1
        )
    )
    try:
        assert layer.response_cache is not None and layer.client is not None
        await layer.response_cache.put("k", b"v")
        got = await layer.response_cache.get("k")
        first = await layer.limiter.admit(Principal(key_id=1), 0)
        second = await layer.limiter.admit(Principal(key_id=1), 0)
        return got == b"v" and first.allowed and not second.allowed and layer.breaker.state == "closed"  # type: ignore[union-attr]
    finally:
        await layer.close()


async def test_password_url() -> None:
    server = PrivateRedis()
    server.start(extra=("--requirepass", "s3cret-pass"))
    try:
        assert await exercise(f"redis://:s3cret-pass@127.0.0.1:{server.port}/0")
        # a wrong password is a failure the fallbacks absorb, never an exception
        assert not await exercise(f"redis://:wrong@127.0.0.1:{server.port}/0")
    finally:
        server.kill()


def make_certs(folder: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )


async def test_tls_url(tmp_path: Path) -> None:
    make_certs(tmp_path)
    server = PrivateRedis()
    # the plain port is private too; the client below only talks TLS on tls_port
    tls_port = PrivateRedis().port
    server.start(
        extra=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(tmp_path / "server.pem"),
            "--tls-key-file",
            str(tmp_path / "server.key"),
            "--tls-ca-cert-file",
            str(tmp_path / "ca.pem"),
            "--tls-auth-clients",
            "no",
        )
    )
    try:
        ca = tmp_path / "ca.pem"
        assert await exercise(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}")
        # plain text to the TLS port fails (and is absorbed by the fallbacks)
        assert not await exercise(f"redis://127.0.0.1:{tls_port}/0")
    finally:
        server.kill()
