-- stream_start: a creator goes live in a new room (or gets back the room already live).
--
-- KEYS[1] room hash   KEYS[2] creator's live-room pointer
-- ARGV[1] room id   ARGV[2] creator id   ARGV[3] creator name   ARGV[4] title
-- Returns: {room id, created 1|0}

local current = redis.call('GET', KEYS[2])
if current then
  return {current, 0}
end
local now = redis.call('TIME')[1]
redis.call('HSET', KEYS[1], 'room', ARGV[1], 'creator', ARGV[2], 'creator_name', ARGV[3],
  'title', ARGV[4], 'live', '1', 'seq', '0', 'coins', '0', 'gifts', '0', 'started', now)
redis.call('SET', KEYS[2], ARGV[1])
return {ARGV[1], 1}
