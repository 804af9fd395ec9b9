"""The live event feed: every channel read once, fanned out to each viewer.

Two readers run while at least one viewer is connected. One listens on
Pub/Sub to every broadcast channel (a pattern subscription). The other reads
every durable channel's stream with XREAD, from the entries added after it
started, without joining a consumer group, so it takes no work from any
subscriber. Each viewer gets a bounded queue: a viewer too slow to keep up
loses the events that do not fit, and gets a message with their count.

Redo streams (retries and replays) are not read, so a replayed dead letter
does not show up a second time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from hivebus import codec
from hivebus.bus import Bus
from hivebus.connection import TRANSIENT_ERRORS, Backoff
from hivebus.errors import InvalidEventError

logger = logging.getLogger(__name__)

QUEUE_SIZE = 1000  # events buffered per viewer before the viewer loses events
PREVIEW_CHARS = 300  # characters of an event's data shown in the feed
READ_BLOCK_MS = 1000  # maximum wait of one XREAD, and of one Pub/Sub read
CHANNELS_REFRESH = 2.0  # seconds between looks for newly created durable channels
JOIN_TIMEOUT = 5.0  # seconds a new viewer waits for the readers to be in place
ERROR_PAUSE = (
    1.0  # seconds a reader waits after an unexpected error, to avoid a hot loop
)


@dataclass(slots=True, eq=False)
class Viewer:
    """One connected feed client: its queue and its filters."""

    channels: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    queue: asyncio.Queue[dict[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_SIZE)
    )
    dropped: int = 0

    def wants(self, item: dict[str, Any]) -> bool:
        """Tell whether ``item`` passes this viewer's channel and type filters."""
        if self.channels and not _matches(item["channel"], self.channels):
            return False
        return not self.types or _matches(item["type"], self.types)

    def offer(self, item: dict[str, Any]) -> None:
        if not self.wants(item):
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1


class Feed:
    """Read every channel of one bus while anyone watches, and fan it out."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._viewers: set[Viewer] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._positioned = asyncio.Event()

    async def join(self, viewer: Viewer) -> None:
        """Add ``viewer``, starting the readers if it is the first.

        Returns once the readers are in place, so the viewer gets every event
        published after this returns. While Redis is unreachable it returns
        after ``JOIN_TIMEOUT`` seconds, and the readers catch up when it is back.
        """
        self._viewers.add(viewer)
        if not self._tasks:
            self._subscribed.clear()
            self._positioned.clear()
            self._tasks = [
                asyncio.create_task(self._read_broadcasts(), name="hivebus-feed-bc"),
                asyncio.create_task(self._read_streams(), name="hivebus-feed-streams"),
            ]
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                await self._subscribed.wait()
                await self._positioned.wait()
        except TimeoutError:
            logger.warning("feed readers not ready, viewer joins anyway")

    async def leave(self, viewer: Viewer) -> None:
        """Remove ``viewer``, stopping the readers if it was the last."""
        self._viewers.discard(viewer)
        if not self._viewers:
            await self.close()

    async def close(self) -> None:
        """Stop the readers."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _publish(self, channel: str, body: bytes | str, delivery: str) -> None:
        try:
            event = codec.decode_envelope(body, self._bus.settings.max_event_bytes)
        except InvalidEventError as exc:
            logger.debug(
                "feed skipped undecodable entry channel=%s error=%s", channel, exc
            )
            return
        data = json.dumps(event.model_dump(mode="json")["data"])
        item = {
            "id": event.id,
            "channel": channel,
            "delivery": delivery,
            "type": event.type,
            "source": event.source,
            "time": event.time.isoformat(),
            "subject": event.subject,
            "correlationid": event.correlationid,
            "causationid": event.causationid,
            "preview": data[:PREVIEW_CHARS],
        }
        for viewer in list(self._viewers):
            viewer.offer(item)

    async def _read_broadcasts(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        keys = self._bus.keys
        while True:
            pubsub = self._bus.client.pubsub()
            try:
                await pubsub.psubscribe(keys.broadcast("*"))
                await _confirmed(pubsub)
                self._subscribed.set()
                backoff.reset()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=READ_BLOCK_MS / 1000
                    )
                    if message is not None and message["type"] == "pmessage":
                        channel = keys.channel_of(_text(message["channel"]))
                        self._publish(channel, message["data"], "broadcast")
            except TRANSIENT_ERRORS as exc:
                await _pause("broadcast", exc, backoff)
            except Exception:
                logger.exception("feed reader failed, restarting reader=broadcast")
                await asyncio.sleep(ERROR_PAUSE)
            finally:
                await asyncio.shield(pubsub.aclose())

    async def _read_streams(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        positions: dict[str, str] = {}
        next_refresh = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() >= next_refresh:
                    await self._add_streams(positions)
                    next_refresh = loop.time() + CHANNELS_REFRESH
                    self._positioned.set()
                await self._read_once(positions)
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                await _pause("stream", exc, backoff)
            except Exception:
                logger.exception("feed reader failed, restarting reader=stream")
                await asyncio.sleep(ERROR_PAUSE)

    async def _add_streams(self, positions: dict[str, str]) -> None:
        client, keys = self._bus.client, self._bus.keys
        for member in await client.smembers(keys.channels):
            stream = keys.stream(_text(member))
            if stream in positions:
                continue
            last = await client.xrevrange(stream, count=1)
            positions[stream] = _text(last[0][0]) if last else "0-0"

    async def _read_once(self, positions: dict[str, str]) -> None:
        if not positions:
            await asyncio.sleep(READ_BLOCK_MS / 1000)
            return
        streams: dict[Any, Any] = dict(positions)
        reply: Any = await self._bus.client.xread(
            streams, count=100, block=READ_BLOCK_MS
        )
        for stream_name, rows in reply or []:
            stream = _text(stream_name)
            channel = self._bus.keys.channel_of(stream)
            for entry_id, fields in rows:
                positions[stream] = _text(entry_id)
                body = (fields or {}).get(b"e")
                if body is not None:
                    self._publish(channel, body, "durable")


async def _confirmed(pubsub: Any) -> None:
    """Wait for the server's reply to PSUBSCRIBE, so the pattern is active."""
    while True:
        message = await pubsub.get_message(timeout=READ_BLOCK_MS / 1000)
        if message is not None and message["type"] == "psubscribe":
            return


async def _pause(reader: str, error: BaseException, backoff: Backoff) -> None:
    delay = backoff.next_delay()
    logger.warning(
        "feed reader lost redis, retrying reader=%s attempt=%d delay=%.2fs error=%s",
        reader,
        backoff.attempt,
        delay,
        error,
    )
    await asyncio.sleep(delay)


def _matches(value: str | None, patterns: tuple[str, ...]) -> bool:
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
