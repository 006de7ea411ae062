-- A creator's new overlay key, and its announcement, in one step (livegift/overlays.py).
-- A script rather than MULTI/EXEC: on a Redis Cluster a transaction may not PUBLISH,
-- while a script's PUBLISH reaches subscribers on every node.
-- KEYS[1] lg:{u:<user>}:overlay   string sha256 hex of the current key
-- ARGV[1] the new key's sha256 hex
-- ARGV[2] the channel to announce it on (lg:{u:<user>}:ch)
-- ARGV[3] the announcement, {"type":"overlay_key","id":...}
-- Returns 1.
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
