"""Every Redis key and channel name, in one place.

All money moves and the room sequence a gift reports must change in one atomic Lua call,
so every key a money script touches carries the same cluster hash tag (``{lg}``): each
script touches exactly one slot. Room channels carry the room's own tag so pub/sub can
later move to sharded pub/sub per room without renaming anything.

    lg:{lg}:w:<user>                 hash  coins, diamonds           wallet
    lg:{lg}:name:<user>              string display name seen last
    lg:{lg}:txn:<txn>                string JSON transaction         receipt idempotency (kept)
    lg:{lg}:req:<user>:<req>         string JSON outcome             gift idempotency (24 h)
    lg:{lg}:rl:<user>                hash  tokens, ts                gift rate bucket
    lg:{lg}:spend:<user>:<yyyymmdd>  string coins spent that day     optional daily cap
    lg:{lg}:room:<room>              hash  creator, name, live, seq, coins, gifts, title, ...
                                           (expires ended_room_ttl after the stream ends)
    lg:{lg}:room:<room>:hist         zset  score=seq member=event JSON   resume history
                                           (expires history_seconds after the end)
    lg:{lg}:room:<room>:combo:<user> hash  gift, combo, ts           streak state (expires)
    lg:{lg}:room:<room>:top          zset  user -> coins this stream  (as the room hash)
    lg:{lg}:creator:<user>:live      string room id of the creator's live stream
    lg:{lg}:ledger                   stream  immutable ledger entries
    lg:{lg}:acct:<user>              zset  score=n member=entry id  one account's entries
    lg:{lg}:minted                   string coins minted by purchases
    lg:{lg}:held                     string diamonds held by payouts not failed
    lg:{lg}:payout:<id>              hash  payout
    lg:{lg}:payouts:<user>           zset  payout ids by time
    lg:{lg}:pidem:<user>:<key>       string JSON first response     payout idempotency (48 h)
    lg:{lg}:paycap:<user>:<yyyymmdd> string net cents paid out that day
    lg:{room}:ch                     channel room events (JSON, one event per message)
    lg:{room}:presence               hash  process id -> member count (viewers)
    lg:{u:<user>}:overlay            string sha256 hex of the user's overlay key
    lg:{u:<user>}:ch                 channel the creator's feed: stream_started, overlay_key
"""

from __future__ import annotations

import re

PREFIX = "lg"
TAG = "{lg}"
BASE = f"{PREFIX}:{TAG}"


def wallet(user: str) -> str:
    return f"{BASE}:w:{user}"


def name(user: str) -> str:
    return f"{BASE}:name:{user}"


def txn(txn_id: str) -> str:
    return f"{BASE}:txn:{txn_id}"


def gift_req(user: str, req: str) -> str:
    return f"{BASE}:req:{user}:{req}"


def rate(user: str) -> str:
    return f"{BASE}:rl:{user}"


def spend(user: str, day: str) -> str:
    return f"{BASE}:spend:{user}:{day}"


# A user id (PROTOCOL §1) or a room id, as the HTTP routes and the WebSocket join accept
# them (start_stream makes 11 of [A-Za-z0-9]). No ':', so no id names another key
# ("<room>:hist" is no room). Use with fullmatch.
ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
ROOM_ID = ID


def is_room(room_id: str) -> bool:
    return ROOM_ID.fullmatch(room_id) is not None


def room(room_id: str) -> str:
    return f"{BASE}:room:{room_id}"


def history(room_id: str) -> str:
    return f"{BASE}:room:{room_id}:hist"


def combo(room_id: str, user: str) -> str:
    return f"{BASE}:room:{room_id}:combo:{user}"


def top(room_id: str) -> str:
    return f"{BASE}:room:{room_id}:top"


def creator_live(user: str) -> str:
    return f"{BASE}:creator:{user}:live"


LEDGER = f"{BASE}:ledger"
MINTED = f"{BASE}:minted"
HELD = f"{BASE}:held"
WALLET_PREFIX = f"{BASE}:w:"
PAYOUT_PREFIX = f"{BASE}:payout:"


def account(user: str) -> str:
    return f"{BASE}:acct:{user}"


def payout(payout_id: str) -> str:
    return f"{BASE}:payout:{payout_id}"


def payouts(user: str) -> str:
    return f"{BASE}:payouts:{user}"


def payout_idem(user: str, key: str) -> str:
    return f"{BASE}:pidem:{user}:{key}"


def payout_cap(user: str, day: str) -> str:
    return f"{BASE}:paycap:{user}:{day}"


def channel(room_id: str) -> str:
    return f"{PREFIX}:{{{room_id}}}:ch"


def presence(room_id: str) -> str:
    return f"{PREFIX}:{{{room_id}}}:presence"


def overlay_key(user: str) -> str:
    return f"{PREFIX}:{{u:{user}}}:overlay"


def creator_channel(user: str) -> str:
    return f"{PREFIX}:{{u:{user}}}:ch"


ENTRY_SEQ = f"{BASE}:ledger:n"
