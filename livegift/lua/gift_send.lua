-- gift_send: step 1 of a gift, in the viewer's partition (keys.py: "Gifts cross
-- partitions"). Checks everything before the first write; a refused gift changes nothing.
-- Then: debit the viewer, write the gift_debit entry (its id names the transfer), record
-- the transfer in the partition's outbox, and remember the outcome under the req.
-- gift_land (the creator's partition) then credits the creator, or voids the transfer.
--
-- KEYS[1] viewer wallet   KEYS[2] req outcome   KEYS[3] rate bucket ("<tokens> <ms>")
-- KEYS[4] daily spend counter   KEYS[5] ledger stream   KEYS[6] ledger entry counter
-- KEYS[7] viewer account index   KEYS[8] outbox   KEYS[9] sync counter
-- (The viewer's display name is kept when the viewer joins a room, not per gift.)
-- ARGV[1] user id   ARGV[2] user name   ARGV[3] adult 1|0   ARGV[4] room id   ARGV[5] req
-- ARGV[6] gift id   ARGV[7] gift name   ARGV[8] gift coins  ARGV[9] streakable 1|0
-- ARGV[10] count    ARGV[11] rate/s     ARGV[12] burst      ARGV[13] daily cap (0 = off)
-- ARGV[14] the room's creator ('' for no such room)   ARGV[15] this partition's number
-- Returns: {transfer JSON, balance after, replay 0|1, transfer id}. A replay (the req seen
-- before) returns the first call's transfer and balance ('' for the id: it is in the JSON);
-- the caller lands it again (idempotent).
-- Errors: idempotency_conflict, stream_not_live (no such room), not_adult, self_gift,
-- insufficient_funds, rate_limited.

local user, uname, room_id, req = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local gift_id = ARGV[6]
local gift_coins, count = tonumber(ARGV[8]), tonumber(ARGV[10])
local creator = ARGV[14]
local fingerprint = room_id .. '|' .. gift_id .. '|' .. ARGV[10]

-- Exactly once: a remembered req returns its first outcome.
local prior = redis.call('GET', KEYS[2])
if prior then
  local sep = string.find(prior, '\n', 1, true)
  if string.sub(prior, 1, sep - 1) ~= fingerprint then
    return redis.error_reply('idempotency_conflict')
  end
  local sep2 = string.find(prior, '\n', sep + 1, true)
  synced(KEYS[9])
  return {string.sub(prior, sep2 + 1), tonumber(string.sub(prior, sep + 1, sep2 - 1)), 1, ''}
end

if creator == '' then
  return redis.error_reply('stream_not_live')
end
if ARGV[3] ~= '1' then
  return redis.error_reply('not_adult')
end
if creator == user then
  return redis.error_reply('self_gift')
end
local cost = gift_coins * count
local balance = tonumber(redis.call('HGET', KEYS[1], 'coins') or '0')
if balance < cost then
  return redis.error_reply('insufficient_funds')
end
local now = now_ms()
local rate, burst = tonumber(ARGV[11]), tonumber(ARGV[12])
local bucket = redis.call('GET', KEYS[3])
local tokens = burst
if bucket then
  local sep = string.find(bucket, ' ', 1, true)
  local last = tonumber(string.sub(bucket, sep + 1))
  tokens = math.min(burst, tonumber(string.sub(bucket, 1, sep - 1)) + (now - last) * rate / 1000)
end
if tokens < 1 then
  return redis.error_reply('rate_limited')
end
local cap = tonumber(ARGV[13])
if cap > 0 then
  local spent = tonumber(redis.call('GET', KEYS[4]) or '0')
  if spent + cost > cap then
    return redis.error_reply('rate_limited daily coin-spend cap reached')
  end
end

-- All checks passed: from here on, only writes.
redis.call('SET', KEYS[3], tostring(tokens - 1) .. ' ' .. fmt(now), 'PX',
  math.ceil(burst * 1000 / rate) + 1000)
if cap > 0 then
  redis.call('INCRBY', KEYS[4], cost)
  redis.call('EXPIRE', KEYS[4], 172800)
end
local left = redis.call('HINCRBY', KEYS[1], 'coins', -cost)
-- The debit's id names the transfer.
local xfer = fmt(entry(KEYS[5], KEYS[6], KEYS[7], tonumber(ARGV[15]), now, 'gift_debit', user,
  'coins', -cost, left, creator, req, room_id, true))
local transfer = obj({
  'xfer', jstr(xfer), 'user', jstr(user), 'name', jstr(uname), 'creator', jstr(creator),
  'room', jstr(room_id), 'req', jstr(req), 'gift', jstr(gift_id), 'gift_name', jstr(ARGV[7]),
  'gift_coins', fmt(gift_coins), 'streakable', ARGV[9] == '1' and 'true' or 'false',
  'count', fmt(count), 'cost', fmt(cost), 'ts', fmt(now),
})
redis.call('HSET', KEYS[8], xfer, transfer)
redis.call('SET', KEYS[2], fingerprint .. '\n' .. fmt(left) .. '\n' .. transfer, 'EX', 86400)
return {transfer, left, 0, xfer}
