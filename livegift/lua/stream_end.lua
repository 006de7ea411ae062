-- stream_end: the creator ends a live stream; members get stream_ended, and the room's
-- keys start to expire (end_stream in the prelude).
--
-- KEYS[1] room hash   KEYS[2] creator's live-room pointer   KEYS[3] room history
-- KEYS[4] room top gifters
-- ARGV[1] caller id   ARGV[2] channel   ARGV[3] history length   ARGV[4] history ms
-- ARGV[5] seconds an ended room is kept
-- Returns: the stream_ended seq, or 0 when the stream had already ended.
-- Errors: not_found, forbidden.

local room = redis.call('HMGET', KEYS[1], 'creator', 'live', 'room')
if not room[1] then
  return redis.error_reply('not_found no such stream')
end
if room[1] ~= ARGV[1] then
  return redis.error_reply("forbidden only the stream's creator can end it")
end
if room[2] ~= '1' then
  return 0
end
if redis.call('GET', KEYS[2]) == room[3] then
  redis.call('DEL', KEYS[2])
end
return end_stream(KEYS[1], KEYS[3], KEYS[4], ARGV[2], room[3], now_ms(), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5]))
