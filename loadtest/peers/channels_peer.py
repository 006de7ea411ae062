"""The Django Channels peer, written the way the Channels tutorial writes a chat.

An ``AsyncWebsocketConsumer`` joins the room's group on connect; a message from
a member is decoded and sent to the group with ``channel_layer.group_send``;
each member's handler encodes it and sends it. The layer is channels_redis:
the default ``RedisChannelLayer`` (``--layer core``) or the
``RedisPubSubChannelLayer`` (``--layer pubsub``). Served by uvicorn.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import django  # type: ignore[import-untyped,unused-ignore]
from django.conf import settings  # type: ignore[import-untyped,unused-ignore]


def configure(redis_url: str, layer: str) -> None:
    backend = {
        "core": "channels_redis.core.RedisChannelLayer",
        "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    }[layer]
    settings.configure(
        DEBUG=False,
        SECRET_KEY="loadtest-peer",
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["channels"],
        ROOT_URLCONF=__name__,
        ASGI_APPLICATION=f"{__name__}.application",
        CHANNEL_LAYERS={"default": {"BACKEND": backend, "CONFIG": {"hosts": [redis_url]}}},
        LOGGING_CONFIG=None,
    )
    django.setup()


urlpatterns: list[Any] = []


def make_app() -> Any:
    from channels.generic.websocket import (  # type: ignore[import-untyped,unused-ignore]
        AsyncWebsocketConsumer,
    )
    from channels.routing import (  # type: ignore[import-untyped,unused-ignore]
        ProtocolTypeRouter,
        URLRouter,
    )
    from django.urls import path  # type: ignore[import-untyped,unused-ignore]

    class RoomConsumer(AsyncWebsocketConsumer):  # type: ignore[misc,unused-ignore]
        async def connect(self) -> None:
            self.group = "room_" + self.scope["url_route"]["kwargs"]["room"]
            await self.channel_layer.group_add(self.group, self.channel_name)
            await self.accept()

        async def disconnect(self, code: int) -> None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

        async def receive(
            self, text_data: str | None = None, bytes_data: bytes | None = None
        ) -> None:
            event = json.loads(text_data or "{}")
            await self.channel_layer.group_send(self.group, {"type": "room.event", "event": event})

        async def room_event(self, message: dict[str, Any]) -> None:
            await self.send(text_data=json.dumps(message["event"]))

    return ProtocolTypeRouter(
        {"websocket": URLRouter([path("ws/<str:room>/", RoomConsumer.as_asgi())])}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8003)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--layer", choices=("core", "pubsub"), default="core")
    a = ap.parse_args()
    configure(a.redis, a.layer)
    import uvicorn

    uvicorn.run(
        make_app(),
        host=a.host,
        port=a.port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        ws="websockets",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
