"""Minimal, idiomatic peer servers for ``python -m loadtest compare``.

Each is started as ``python -m loadtest.peers.NAME --host H --port P --redis URL``
and serves the same fan-out workload: a connection joins a room by its URL,
any message a member sends is fanned out to every member of the room through
Redis.
"""
