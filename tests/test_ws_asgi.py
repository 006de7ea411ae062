"""The portable ASGI WebSocket endpoint (``LIVEGIFT_WS=asgi``) passes the same tests.

``livegift serve`` uses the lean protocol in livegift.api.fastws; other ASGI servers reach
livegift.api.ws. The imported tests below run again here against a server in ASGI mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer
from tests.test_liveliness import (  # noqa: F401
    test_joining_mid_batch_gets_no_duplicates,
    test_resume_replays_history_then_live_without_gap_or_duplicate,
)
from tests.test_tokens_overlay import (  # noqa: F401
    test_a_new_overlay_key_closes_old_overlays_on_every_process,
    test_an_expired_token_closes_its_socket_4401_token_expired,
    test_an_op_sent_after_exp_is_never_run,
    test_overlay_key_follows_the_creator_across_streams,
    test_overlay_keys_need_a_user_and_overlays_need_a_key,
    test_refresh_keeps_the_socket_open_past_the_old_exp,
)
from tests.test_ws import (  # noqa: F401
    test_bad_tokens_are_refused_on_websocket,
    test_double_spend_exactly_ten_of_a_hundred_succeed,
    test_endless_garbage_is_closed_1008,
    test_garbage_gets_bad_request_and_socket_stays_open,
    test_msgpack_subprotocol,
    test_oversized_frame_closes_1009,
    test_self_gift_and_ended_stream,
    test_unknown_room_closes_4404,
    test_welcome_then_gift_reaches_every_member,
)


@pytest.fixture(scope="module")
def server_env() -> dict[str, str]:
    return {"LIVEGIFT_WS": "asgi"}


@pytest.fixture(scope="module")
def live_server(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, server_env: dict[str, str]
) -> Iterator[LiveServer]:
    log: Path = tmp_path_factory.mktemp("asgi") / "server.log"
    server = LiveServer(redis_url, server_env, log=log).start()
    yield server
    server.close()
