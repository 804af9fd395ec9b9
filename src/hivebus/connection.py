"""Redis clients for each backend, server checks, and error translation."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from hivebus.config import Settings, redact_url
from hivebus.errors import (
    ConfigError,
    ConsumerGroupMissingError,
    HivebusError,
    RedisUnavailableError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

Redis = aioredis.Redis

# Errors that mean "the server is unreachable or restarting": worth retrying.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    ConnectionError,
    OSError,
)

# Errors that mean the credentials are wrong: redis-py derives them from
# ConnectionError, but retrying cannot fix them.
CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
)

_memory_servers: dict[str, Any] = {}

# A caller that waits for Redis tries again at least once a second, so it
# goes on soon after the server is back. A refused connection costs little.
RETRY_BASE = 0.1
RETRY_CAP = 1.0

MIN_SERVER_VERSION = (7, 0)
SAFE_EVICTION_POLICY = "noeviction"


def process_id() -> str:
    """Return a name for this process that is unique among live processes."""
    return f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**6):06x}"


def memory_server(url: str) -> Any:
    """Return the shared in-process server named by a ``memory://NAME`` URL."""
    import fakeredis

    name = url.removeprefix("memory://").strip("/") or "default"
    server = _memory_servers.get(name)
    if server is None:
        server = fakeredis.FakeServer(version=(7, 2))
        _memory_servers[name] = server
    return server


def connect(
    settings: Settings, *, client_name: str, pool_size: int | None = None
) -> Redis:
    """Create a client for ``settings.redis_url`` with a bounded connection pool."""
    url = settings.redis_url
    if url.startswith("memory://"):
        import fakeredis

        client: Redis = fakeredis.FakeAsyncRedis(server=memory_server(url))
        return client
    options: dict[str, Any] = {
        "max_connections": pool_size or settings.max_connections,
        "timeout": settings.socket_timeout,
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "health_check_interval": settings.health_check_interval,
        "client_name": client_name,
    }
    if url.startswith("rediss://"):
        options.update(
            ssl_ca_certs=settings.tls_ca_certs,
            ssl_certfile=settings.tls_certfile,
            ssl_keyfile=settings.tls_keyfile,
        )
    try:
        pool = aioredis.BlockingConnectionPool.from_url(url, **options)
    except ValueError as exc:
        msg = f"invalid redis_url {redact_url(url)!r}: {exc}"
        raise ConfigError(msg) from exc
    return aioredis.Redis(connection_pool=pool)


def is_nogroup(exc: BaseException) -> bool:
    """Tell whether ``exc`` means a stream or consumer group no longer exists.

    Redis replies NOGROUP to a read of a missing group, and UNBLOCKED to a
    blocked read whose stream was deleted meanwhile.
    """
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(
        ("NOGROUP", "UNBLOCKED")
    )


def translate(exc: BaseException, what: str) -> HivebusError:
    """Map a redis-py exception to the hivebus error that explains it.

    The caller chains the original with ``raise ... from exc``, or sets
    ``__cause__`` when it hands the error to a future.
    """
    if is_nogroup(exc):
        return ConsumerGroupMissingError(
            f"{what}: the stream or consumer group no longer exists ({exc}); "
            "hivebus recreates it, or restart the consumer"
        )
    if isinstance(exc, TRANSIENT_ERRORS):
        return RedisUnavailableError(
            f"{what}: Redis is unreachable ({exc}); check that the server is up "
            "and that `redis_url` names it"
        )
    text = str(exc)
    if text.startswith("OOM"):
        hint = "raise Redis's `maxmemory`, free memory, or shorten `event_ttl`"
    elif text.startswith(("NOPERM", "NOAUTH", "WRONGPASS")):
        hint = "give the Redis user access to the hivebus keys and commands"
    else:
        hint = "see the Redis server log"
    return RedisUnavailableError(f"{what}: Redis returned an error ({exc}); {hint}")


class Backoff:
    """Exponential backoff with full jitter, for reconnect loops."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        """Return the next delay and count the attempt."""
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start again from the base delay after a success."""
        self.attempt = 0


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    deadline: float,
    what: str,
    elapsed: float = 0.0,
) -> T:
    """Run ``operation``, retrying connection failures for ``deadline`` seconds.

    ``elapsed`` is time already spent waiting, for example in a queue, and counts
    against the deadline. The operation runs at least once, and a last time
    at the deadline. One run can overrun the deadline by up to the socket
    timeout. An operation that failed on a timeout may have been applied, so
    a retry can apply it twice.
    """
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline - elapsed
    backoff = Backoff(base=RETRY_BASE, cap=RETRY_CAP)
    while True:
        try:
            return await operation()
        except CREDENTIAL_ERRORS as exc:
            # A wrong password or a missing permission does not heal by waiting.
            msg = (
                f"{what} failed: Redis rejected the credentials ({exc}); check the "
                "user and password in `redis_url` (HIVEBUS_REDIS_URL)"
            )
            raise ConfigError(msg) from exc
        except TRANSIENT_ERRORS as exc:
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                msg = (
                    f"{what} failed: Redis stayed unreachable for {deadline:.1f}s "
                    f"({exc}); check that the server is up, or raise `publish_timeout` "
                    "(HIVEBUS_PUBLISH_TIMEOUT)"
                )
                raise RedisUnavailableError(msg) from exc
            delay = min(backoff.next_delay(), remaining)
            # The first retry is a warning and later ones are INFO, so a short
            # outage shows as one line and the final error gives the rest.
            logger.log(
                logging.WARNING if backoff.attempt == 1 else logging.INFO,
                "redis unreachable, retrying what=%s attempt=%d delay=%.2fs error=%s",
                what,
                backoff.attempt,
                delay,
                exc,
            )
            await asyncio.sleep(delay)


async def check_server(client: Redis, settings: Settings) -> None:
    """Check the server version and warn (or refuse) when keys may be evicted."""
    if settings.redis_url.startswith("memory://"):
        return
    info = await client.info("server")
    version = tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])
    if version < MIN_SERVER_VERSION:
        msg = (
            f"Redis {info['redis_version']} is too old: hivebus needs Redis 7.0 or "
            "newer (or Valkey) for XAUTOCLAIM and stream trimming by MINID"
        )
        raise ConfigError(msg)
    await _check_eviction_policy(client, settings)


async def _check_eviction_policy(client: Redis, settings: Settings) -> None:
    if settings.maxmemory_policy_action == "ignore":
        return
    try:
        config = await client.config_get("maxmemory-policy")
    except redis_errors.ResponseError:
        # Managed services often disable CONFIG; there is nothing to check then.
        logger.info("cannot read maxmemory-policy (CONFIG is disabled); not checked")
        return
    policy = config.get("maxmemory-policy", SAFE_EVICTION_POLICY)
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy == SAFE_EVICTION_POLICY:
        return
    text = (
        f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict "
        "stored events before their TTL ends; set it to 'noeviction'"
    )
    if settings.maxmemory_policy_action == "refuse":
        raise ConfigError(text)
    logger.warning("%s", text)
