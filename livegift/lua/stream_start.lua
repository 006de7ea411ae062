-- stream_start: a creator goes live in a room.
-- One live stream per creator: the creator's other live stream, if any, ends in the same
-- atomic step, its members getting stream_ended (end_stream in the prelude).
-- A new room id starts at seq 0. A room id that already exists (the demo's fixed room) is
-- re-opened in place: its seq carries on, so seqs never repeat within a room, and its keys
-- stop expiring. (Once an ended room has expired, its id starts afresh at seq 0.)
--
-- KEYS[1] room hash   KEYS[2] creator's latest live-room pointer   KEYS[3] room history
-- KEYS[4] room top gifters   KEYS[5] the pointer's room hash (as read before the call;
-- KEYS[1] when none)   KEYS[6] its history   KEYS[7] its top gifters
-- ARGV[1] room id   ARGV[2] creator id   ARGV[3] creator name   ARGV[4] title
-- ARGV[5] the creator's feed (shard) channel: gets {"type":"stream_started","room"} (livegift.follow)
-- ARGV[6] the pointer's room as read before the call ('' for none)   ARGV[7] its channel
-- ARGV[8] history length   ARGV[9] history ms   ARGV[10] seconds an ended room is kept
-- Returns: {room id, created 1|0, the ended stream's stream_ended seq or 0}, or
-- {'', -1, 0} when the pointer is no longer ARGV[6] (the caller reads it again and retries).
-- Errors: forbidden (the room belongs to someone else).

local pointer = redis.call('GET', KEYS[2]) or ''
if pointer ~= ARGV[6] then
  return {'', -1, 0}
end
local owner = redis.call('HGET', KEYS[1], 'creator')
if owner and owner ~= ARGV[2] then
  return redis.error_reply('forbidden this room belongs to another creator')
end

local ended = 0
if pointer ~= '' and pointer ~= ARGV[1] then
  local other = redis.call('HMGET', KEYS[5], 'live', 'creator')
  if other[1] == '1' and other[2] == ARGV[2] then
    ended = end_stream(KEYS[5], KEYS[6], KEYS[7], ARGV[7], pointer, now_ms(), tonumber(ARGV[8]),
      tonumber(ARGV[9]), tonumber(ARGV[10]))
  end
end
local created = 0
if owner then
  redis.call('HSET', KEYS[1], 'live', '1', 'creator_name', ARGV[3])
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[3])
  redis.call('PERSIST', KEYS[4])
else
  created = 1
  redis.call('HSET', KEYS[1], 'room', ARGV[1], 'creator', ARGV[2], 'creator_name', ARGV[3],
    'title', ARGV[4], 'live', '1', 'seq', '0', 'coins', '0', 'gifts', '0',
    'started', redis.call('TIME')[1])
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SPUBLISH', ARGV[5], '{"type":"stream_started","room":' .. jstr(ARGV[1]) .. '}')
return {ARGV[1], created, ended}
