-- shoutout: the stream's creator recognises a viewer in front of the room.
--
-- KEYS[1] room hash   KEYS[2] room history
-- ARGV[1] caller id   ARGV[2] recipient id   ARGV[3] text   ARGV[4] channel
-- ARGV[5] history length   ARGV[6] history ms
-- ARGV[7] the recipient's display name (read first: it lives in the recipient's partition)
-- Returns: the shoutout's seq.   Errors: forbidden, stream_not_live.

local room = redis.call('HMGET', KEYS[1], 'creator', 'live', 'room')
if room[1] ~= ARGV[1] then
  return redis.error_reply("forbidden only the stream's creator can give shout-outs")
end
if room[2] ~= '1' then
  return redis.error_reply('stream_not_live')
end
local now = now_ms()
local name = ARGV[7]
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local shout = event('shoutout', seq, now, {
  'room', jstr(room[3]),
  'to', obj({'id', jstr(ARGV[2]), 'name', jstr(name)}),
  'text', jstr(ARGV[3]),
  'auto', 'false',
})
emit(KEYS[2], ARGV[4], seq, shout, now, tonumber(ARGV[5]), tonumber(ARGV[6]))
return seq
