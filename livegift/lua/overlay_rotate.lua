-- A creator's new overlay key, and its announcement, in one step (livegift/overlays.py).
-- KEYS[1] the user's overlay key record (keys.overlay_key): sha256 hex of the current key
-- ARGV[1] the new key's sha256 hex
-- ARGV[2] the user's feed, a shard channel of KEYS[1]'s slot (keys.creator_channel)
-- ARGV[3] the announcement, {"type":"overlay_key","id":...}
-- Returns 1.
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SPUBLISH', ARGV[2], ARGV[3])
return 1
