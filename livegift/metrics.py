"""Prometheus metrics, served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("livegift_connections", "Open WebSocket connections in this process")
ROOMS = Gauge("livegift_rooms", "Rooms with at least one member in this process")
GIFTS = Counter("livegift_gifts_total", "Gift ops by outcome", ["outcome"])
# The gift path's two common outcomes, looked up once (labels() costs a lock and a dict
# lookup per call).
GIFTS_OK = GIFTS.labels("ok")
GIFTS_REPLAYED = GIFTS.labels("replay")
RECHARGES = Counter("livegift_recharges_total", "Recharges by outcome", ["outcome"])
FANOUT_LATENCY = Histogram(
    "livegift_fanout_seconds",
    "From an event's arrival from Redis to its frame written to every local member",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
FANOUT_BATCH = Histogram(
    "livegift_fanout_batch_events",
    "Events per fan-out frame",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
DELIVERIES = Counter("livegift_deliveries_total", "Event deliveries written to members")
SLOW_CLOSES = Counter("livegift_slow_closes_total", "Connections closed with 4008 (too slow)")
REDIS_ERRORS = Counter(
    "livegift_redis_errors_total", "Redis errors by where they happened", ["where"]
)
BAD_FRAMES = Counter("livegift_bad_frames_total", "Client frames answered with bad_request")
BAD_EVENTS = Counter(
    "livegift_bad_events_total", "Room events from Redis the hub could not read (dropped)"
)
