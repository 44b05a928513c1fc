"""A Redis that requires a password (as compose runs it): the services take it inside
their Redis URL and serve; a wrong password fails clearly at startup."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.cluster.redis_embed import redis_server_binary
from tests.cluster import Cluster

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-pw"


@pytest.fixture()
def locked_redis(tmp_path: Path) -> Iterator[str]:
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
         "--appendonly", "no", "--requirepass", PASSWORD,
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < end and proc.poll() is None
            time.sleep(0.02)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_services_use_the_password_in_the_url(locked_redis: str) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(locked_redis).ping()  # the lock is real
    async with Cluster(f"{locked_redis}?password={PASSWORD}") as c:
        ids, _, last = await c.generate(prompt_token_ids=[9] * 8, max_tokens=3)
        assert len(ids) == 3 and last.finish_reason
    with pytest.raises(redis.RedisError):
        async with Cluster(f"{locked_redis}?password=wrong"):
            pass
