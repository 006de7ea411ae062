-- stream_start: a creator goes live in a room.
-- A new room id starts at seq 0. A room id that already exists (the demo's fixed room) is
-- re-opened in place: its seq carries on, so seqs never repeat within a room.
--
-- KEYS[1] room hash   KEYS[2] creator's latest live-room pointer
-- ARGV[1] room id   ARGV[2] creator id   ARGV[3] creator name   ARGV[4] title
-- Returns: {room id, created 1|0}   Errors: forbidden (the room belongs to someone else).

local now = redis.call('TIME')[1]
local owner = redis.call('HGET', KEYS[1], 'creator')
if owner then
  if owner ~= ARGV[2] then
    return redis.error_reply('forbidden this room belongs to another creator')
  end
  redis.call('HSET', KEYS[1], 'live', '1', 'creator_name', ARGV[3])
  redis.call('SET', KEYS[2], ARGV[1])
  return {ARGV[1], 0}
end
redis.call('HSET', KEYS[1], 'room', ARGV[1], 'creator', ARGV[2], 'creator_name', ARGV[3],
  'title', ARGV[4], 'live', '1', 'seq', '0', 'coins', '0', 'gifts', '0', 'started', now)
redis.call('SET', KEYS[2], ARGV[1])
return {ARGV[1], 1}
