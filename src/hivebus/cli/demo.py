"""The main job: until the agent team exists, a short tour of the bus."""

from __future__ import annotations

from hivebus.cli.common import RedisOption, app, console, run


@app.command()
def demo(redis: RedisOption = "memory://") -> None:
    """Run a short tour of the bus: publish, retry, dead letter and replay."""
    from hivebus.demo import tour

    run(lambda: tour(redis, console))
