-- stream_end: the creator ends a live stream; members get stream_ended.
--
-- KEYS[1] room hash   KEYS[2] creator's live-room pointer   KEYS[3] room history
-- ARGV[1] caller id   ARGV[2] channel   ARGV[3] history length   ARGV[4] history ms
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
local now = now_ms()
redis.call('HSET', KEYS[1], 'live', '0', 'ended', fmt(now))
if redis.call('GET', KEYS[2]) == room[3] then
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local ended = event('stream_ended', seq, now, {'room', jstr(room[3])})
emit(KEYS[3], ARGV[2], seq, ended, now, tonumber(ARGV[3]), tonumber(ARGV[4]))
return seq
