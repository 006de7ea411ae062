"""Every Redis key and channel name, in one place, and which partition each belongs to.

The money path is split into ``PARTITIONS`` partitions. Each user's keys (wallet, ledger
index, req outcomes, rate bucket, payouts, overlay key, feed channel) live in the user's
partition, chosen from the user id; each room's keys live in the partition of its
creator, which the room id itself names (its first two characters, see
:func:`new_room_id`), and so does a payout id. A partition is one cluster hash tag
(``{p<i>.<k>}``), picked so that partition ``i`` hashes to slot ``i × 16384/PARTITIONS``
+ a little: the partitions are spread evenly over the slots, whatever the number of
masters. Every Lua script touches the keys of one partition only (one slot), and no key
is touched by every gift: each partition has its own ledger, counters and outbox.

A gift from viewer V to the creator C of room R is a transfer between two partitions, in
two atomic steps (docs/money.md, "Gifts cross partitions"): ``gift_send`` in V's
partition (debit, ledger entry, req outcome, outbox record), then ``gift_land`` in C's
(credit, ledger entry, seq, combo, history, SPUBLISH) or, when R is no longer live,
``gift_void`` back in V's partition (the coins return, once).

Per user U (in partition P(U)):

    lg:{P}:w:<U>                   hash  coins, diamonds, rl       wallet; rl: the gift rate
                                                                    bucket, "<tokens> <ms>"
    lg:{P}:name:<U>                string display name seen last
    lg:{P}:acct:<U>                zset  score=entry id member=stream id  U's ledger entries
    lg:{P}:req:<U>:<req>           string fingerprint \\n outcome   gift idempotency (24 h)
    lg:{P}:spend:<U>:<yyyymmdd>    string coins spent that day     optional daily cap
    lg:{P}:txn:<txn>               string JSON transaction         receipt, credited once
    lg:{P}:creator:<U>:live        string room id of U's live stream
    lg:{P}:payouts:<U>             zset  payout ids by time
    lg:{P}:pidem:<U>:<key>         string JSON first response     payout idempotency (48 h)
    lg:{P}:paycap:<U>:<yyyymmdd>   string net cents paid out that day
    lg:{P}:overlay:<U>             string sha256 hex of U's overlay key
    lg:{P}:feed:<U>                shard channel  U's feed: stream_started, overlay_key

Per room R (in partition P(R) = P(creator of R)):

    lg:{P}:room:<R>                hash  creator, name, live, seq, coins, gifts, title, ...
    lg:{P}:room:<R>:hist           zset  score=seq member=event JSON   resume history
    lg:{P}:room:<R>:combo:<U>      string "<gift> <combo> <ms>"     streak state (expires)
    lg:{P}:room:<R>:top            zset  user -> coins this stream
    lg:{P}:room:<R>:ch             shard channel  room events (JSON, one event per message)
    lg:{R}:presence                hash  process id -> member count (viewers)

Per payout X (in partition P(X), named by the id like a room's):

    lg:{P}:payout:<X>              hash  payout

Per partition P:

    lg:{P}:ledger                  stream  immutable ledger entries of P's accounts
    lg:{P}:ledger:n                string  entries so far (entry ids: n × PARTITIONS + i)
    lg:{P}:minted                  string  coins minted by purchases in P
    lg:{P}:held                    string  diamonds held by P's payouts not failed
    lg:{P}:outbox                  hash    transfer id -> transfer JSON: gifts debited in P
                                           and not yet known to be landed or voided
    lg:{P}:landed:<T>              string  "<seq> <combo>" or "void": transfer T's outcome
                                           in the creator's partition (25 h)
    lg:{P}:sync                    string  written by a replayed call, so that WAIT after
                                           it covers the write it replays

Not money, one key each: ``lg:{txn:<txn>}:owner`` (the user a store txn was first
credited to, so a receipt never credits two users).
"""

from __future__ import annotations

import re
import zlib
from functools import cache, lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "lg"
# Fixed for the lifetime of a deployment's data: it decides where every key lives.
PARTITIONS = 256
_SPAN = REDIS_CLUSTER_HASH_SLOTS // PARTITIONS
B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62_INDEX = {c: i for i, c in enumerate(B62)}

# A user id (PROTOCOL §1) or a room id, as the HTTP routes and the WebSocket join accept
# them (new_room_id makes 11 of [A-Za-z0-9]). No ':', so no id names another key
# ("<room>:hist" is no room). Use with fullmatch.
ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
ROOM_ID = ID


@cache
def _tags() -> tuple[str, ...]:
    """Partition i's hash tag: the first ``p<i>.<k>`` whose slot is in i's span."""
    out = []
    for i in range(PARTITIONS):
        k = 0
        while not i * _SPAN <= key_slot(f"p{i}.{k}".encode()) < (i + 1) * _SPAN:
            k += 1
        out.append(f"{{p{i}.{k}}}")
    return tuple(out)


def tag(partition: int) -> str:
    """The hash tag, braces included, of a partition."""
    return _tags()[partition]


def base(partition: int) -> str:
    return f"{PREFIX}:{tag(partition)}"


def user_partition(user: str) -> int:
    return zlib.crc32(user.encode()) % PARTITIONS


def code(partition: int) -> str:
    """The two characters that name a partition at the start of a room id."""
    return B62[partition // 62] + B62[partition % 62]


def _named_partition(name: str) -> int:
    """The partition the first two characters of ``name`` name; a name that does not
    start with two of [0-9A-Za-z] gets one from its hash."""
    a, b = _B62_INDEX.get(name[:1]), _B62_INDEX.get(name[1:2])
    if a is None or b is None:
        return zlib.crc32(name.encode()) % PARTITIONS
    return (a * 62 + b) % PARTITIONS


def room_partition(room_id: str) -> int:
    return _named_partition(room_id)


def new_room_id(creator: str, suffix: str) -> str:
    """A room id of ``creator``'s partition: its code, then ``suffix``."""
    return code(user_partition(creator)) + suffix


def payout_partition(payout_id: str) -> int:
    return _named_partition(payout_id.removeprefix("po_"))


def new_payout_id(user: str, suffix: str) -> str:
    return f"po_{code(user_partition(user))}{suffix}"


@lru_cache(maxsize=1 << 16)
def _u(user: str) -> str:
    return base(user_partition(user))


@lru_cache(maxsize=1 << 14)
def _r(room_id: str) -> str:
    return base(room_partition(room_id))


def is_room(room_id: str) -> bool:
    return ROOM_ID.fullmatch(room_id) is not None


# -- per user --------------------------------------------------------------------------


def wallet(user: str) -> str:
    return f"{_u(user)}:w:{user}"


def name(user: str) -> str:
    return f"{_u(user)}:name:{user}"


def account(user: str) -> str:
    return f"{_u(user)}:acct:{user}"


def gift_req(user: str, req: str) -> str:
    return f"{_u(user)}:req:{user}:{req}"


def spend(user: str, day: str) -> str:
    return f"{_u(user)}:spend:{user}:{day}"


def txn(user: str, txn_id: str) -> str:
    return f"{_u(user)}:txn:{txn_id}"


def txn_owner(txn_id: str) -> str:
    return f"{PREFIX}:{{txn:{txn_id}}}:owner"


def creator_live(user: str) -> str:
    return f"{_u(user)}:creator:{user}:live"


def payouts(user: str) -> str:
    return f"{_u(user)}:payouts:{user}"


def payout_idem(user: str, key: str) -> str:
    return f"{_u(user)}:pidem:{user}:{key}"


def payout_cap(user: str, day: str) -> str:
    return f"{_u(user)}:paycap:{user}:{day}"


def overlay_key(user: str) -> str:
    return f"{_u(user)}:overlay:{user}"


def creator_channel(user: str) -> str:
    return f"{_u(user)}:feed:{user}"


# -- per room --------------------------------------------------------------------------


def room(room_id: str) -> str:
    return f"{_r(room_id)}:room:{room_id}"


def history(room_id: str) -> str:
    return f"{_r(room_id)}:room:{room_id}:hist"


def combo(room_id: str, user: str) -> str:
    return f"{_r(room_id)}:room:{room_id}:combo:{user}"


def top(room_id: str) -> str:
    return f"{_r(room_id)}:room:{room_id}:top"


def channel(room_id: str) -> str:
    return f"{_r(room_id)}:room:{room_id}:ch"


def presence(room_id: str) -> str:
    return f"{PREFIX}:{{{room_id}}}:presence"


# -- per payout ------------------------------------------------------------------------


def payout(payout_id: str) -> str:
    return f"{base(payout_partition(payout_id))}:payout:{payout_id}"


# -- per partition ---------------------------------------------------------------------


def ledger(partition: int) -> str:
    return f"{base(partition)}:ledger"


def entry_seq(partition: int) -> str:
    return f"{base(partition)}:ledger:n"


def minted(partition: int) -> str:
    return f"{base(partition)}:minted"


def held(partition: int) -> str:
    return f"{base(partition)}:held"


def outbox(partition: int) -> str:
    return f"{base(partition)}:outbox"


def landed(partition: int, transfer: str) -> str:
    return f"{base(partition)}:landed:{transfer}"


def sync(partition: int) -> str:
    return f"{base(partition)}:sync"


def entry_partition(entry_id: int) -> int:
    """The partition whose ledger holds the entry with this (ledger-wide) id."""
    return entry_id % PARTITIONS
