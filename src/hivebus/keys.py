"""Every Redis key and Pub/Sub channel name that hivebus uses.

All keys start with the configured prefix (``hivebus`` by default). Keys that
belong to one channel carry the channel in a hash tag (``{orders}``), so they
share one Redis Cluster slot and one Lua script may touch them together.

========================================  ======  ==========  ======================
pattern                                   type    TTL         written by
========================================  ======  ==========  ======================
``P:event:ID``                            string  event_ttl   publisher (event JSON)
``P:{CH}:stream``                         stream  none        publisher, trimmer
``P:{CH}:bc``                             pubsub  n/a         publisher (broadcast)
``P:{CH}:retry:GROUP``                    zset    none        consumer (due time ms)
``P:{CH}:redo:GROUP``                     stream  none        retry mover, DLQ replay
``P:{CH}:dlq``                            stream  none        consumer (dead letters)
``P:{CH}:once:KEY``                       string  event_ttl   idempotency helper
``P:channels``                            set     none        consumers (durable names)
``P:breaker:{NAME}``                      hash    none        circuit breaker
``P:breaker:{NAME}:probe``                string  probe lease circuit breaker
``P:errors``                              hash    none        error handler counters
``P:errors:recent``                       list    none        error handler
``P:reply:PROCESS``                       pubsub  n/a         responders (replies)
``P:ctx:{ID}``                            hash    none        context manager
``P:ctx:{ID}:v:VERSION``                  hash    retention   context manager
``P:ctx:metrics``                         hash    none        context manager, caches
``P:ctx:sizes``                           zset    none        context manager (bytes)
``P:stats``                               hash    none        publisher counters
``P:task:{ID}``                           hash    none        client, master, task end
``P:task:{ID}:end``                       string  none        task end (written once)
``P:task:{ID}:steps``                     hash    none        master, pm (step owners)
``P:task:{ID}:plans``                     hash    none        master, pm (plans)
``P:task:{ID}:stories:VERSION``           hash    none        master (plan's stories)
``P:task:{ID}:story:KEY``                 hash    none        master, workers (rounds)
``P:task:{ID}:board``                     hash    none        master (role states)
``P:task:{ID}:progress``                  stream  none        master, client, task end
``P:task:{ID}:events``                    list    none        team, client (event tree)
``P:task:{ID}:calls``                     list    none        team (brain calls)
``P:task:{ID}:tokens``                    hash    none        team (tokens by role)
``P:task:{ID}:prompts``                   list    none        master (prompt changes)
``P:task:{ID}:dead``                      list    none        master (dead letters)
``P:task:{ID}:lease:ITEM``                string  lease       worker doing the item
``P:tasks``                               zset    none        client (by submit time)
``P:tasks:awaiting``                      zset    none        master, client (deadline)
``P:prompt:{ROLE}``                       hash    none        prompt store (latest, pin)
``P:prompt:{ROLE}:v:VERSION``             string  none        prompt store (JSON)
========================================  ======  ==========  ======================

Streams, groups and dead letters never get a TTL, so that a ``volatile-*``
eviction policy cannot remove them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hivebus.errors import InvalidChannelError

CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
PATTERN_RE = re.compile(r"^[A-Za-z0-9_.\-*?]{1,200}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def check_channel(channel: str) -> str:
    """Return ``channel`` unchanged, or raise if it cannot name a channel."""
    if not isinstance(channel, str) or not CHANNEL_RE.match(channel):
        msg = (
            f"invalid channel name {channel!r}: use 1-200 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (for example 'orders.created')"
        )
        raise InvalidChannelError(msg)
    return channel


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` unchanged, or raise if it cannot match channel names."""
    if not isinstance(pattern, str) or not PATTERN_RE.match(pattern):
        msg = (
            f"invalid channel pattern {pattern!r}: use channel characters plus the "
            "wildcards '*' and '?' (for example 'orders.*')"
        )
        raise InvalidChannelError(msg)
    return pattern


def check_name(kind: str, name: str) -> str:
    """Return ``name`` unchanged, or raise if it cannot name a group or service."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        msg = (
            f"invalid {kind} name {name!r}: use 1-100 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
        raise InvalidChannelError(msg)
    return name


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builders for one namespace prefix."""

    prefix: str = "hivebus"

    def event(self, event_id: str) -> str:
        """Return the key of a stored event body."""
        return f"{self.prefix}:event:{event_id}"

    def stream(self, channel: str) -> str:
        """Return the stream key of a durable channel."""
        return f"{self.prefix}:{{{channel}}}:stream"

    def broadcast(self, channel: str) -> str:
        """Return the Pub/Sub channel name of a broadcast channel or pattern."""
        return f"{self.prefix}:{{{channel}}}:bc"

    def channel_of(self, redis_name: str) -> str:
        """Return the hivebus channel inside a stream key or Pub/Sub name."""
        start = redis_name.index("{") + 1
        return redis_name[start : redis_name.index("}", start)]

    def retry(self, channel: str, group: str) -> str:
        """Return the sorted set of one group's delayed retries."""
        return f"{self.prefix}:{{{channel}}}:retry:{group}"

    def redo(self, channel: str, group: str) -> str:
        """Return the stream of one group's due retries and replays."""
        return f"{self.prefix}:{{{channel}}}:redo:{group}"

    def dlq(self, channel: str) -> str:
        """Return the dead-letter stream of a channel."""
        return f"{self.prefix}:{{{channel}}}:dlq"

    def once(self, channel: str, key: str) -> str:
        """Return the marker key of the idempotency helper."""
        return f"{self.prefix}:{{{channel}}}:once:{key}"

    @property
    def everything(self) -> str:
        """SCAN pattern that matches every key of this prefix."""
        return f"{self.prefix}:*"

    @property
    def breakers(self) -> str:
        """SCAN pattern that matches every circuit breaker's hash and probe key."""
        return f"{self.prefix}:breaker:*"

    @property
    def channels(self) -> str:
        """Set of durable channel names, for tools that walk every channel."""
        return f"{self.prefix}:channels"

    def breaker(self, name: str) -> str:
        """Return the hash that contains a circuit breaker's shared state."""
        return f"{self.prefix}:breaker:{{{name}}}"

    def breaker_probe(self, name: str) -> str:
        """Return the lease key of a half-open breaker's single probe."""
        return f"{self.prefix}:breaker:{{{name}}}:probe"

    @property
    def errors(self) -> str:
        """Hash of error counters kept by the error handler."""
        return f"{self.prefix}:errors"

    @property
    def errors_recent(self) -> str:
        """List of the most recent failures kept by the error handler."""
        return f"{self.prefix}:errors:recent"

    def reply(self, process_id: str) -> str:
        """Return the Pub/Sub channel on which one process receives replies."""
        return f"{self.prefix}:reply:{process_id}"

    def context(self, context_id: str) -> str:
        """Return the hash of a context's current state."""
        return f"{self.prefix}:ctx:{{{context_id}}}"

    def context_version(self, context_id: str, version: int) -> str:
        """Return the key of one stored version of a context."""
        return f"{self.prefix}:ctx:{{{context_id}}}:v:{version}"

    @property
    def context_metrics(self) -> str:
        """Hash of context counters: reads, updates, conflicts, cache hits."""
        return f"{self.prefix}:ctx:metrics"

    @property
    def context_sizes(self) -> str:
        """Sorted set of context ids, scored by the size of their data in bytes."""
        return f"{self.prefix}:ctx:sizes"

    def task(self, task_id: str, *parts: str) -> str:
        """Return the key of a team task's state, or of one of its parts.

        Every key of a task shares its hash tag, so one transaction may
        touch them together.
        """
        return ":".join((f"{self.prefix}:task:{{{task_id}}}", *parts))

    @property
    def tasks(self) -> str:
        """Sorted set of team task ids, scored by submit time in ms."""
        return f"{self.prefix}:tasks"

    @property
    def tasks_awaiting(self) -> str:
        """Sorted set of tasks awaiting plan approval, scored by their deadline."""
        return f"{self.prefix}:tasks:awaiting"

    def prompt(self, role: str) -> str:
        """Return the hash of a role prompt's latest version number and pin."""
        return f"{self.prefix}:prompt:{{{role}}}"

    def prompt_version(self, role: str, version: int) -> str:
        """Return the key of one stored version of a role prompt."""
        return f"{self.prefix}:prompt:{{{role}}}:v:{version}"

    @property
    def stats(self) -> str:
        """Hash of bus-wide counters, such as events that reached no listener."""
        return f"{self.prefix}:stats"
