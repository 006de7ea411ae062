-- gift_send: step 1 of a gift, in the viewer's partition (keys.py: "Gifts cross
-- partitions"). Checks everything before the first write; a refused gift changes nothing.
-- Then: debit the viewer, write the gift_debit entry (its id names the transfer), record
-- the transfer in the partition's outbox, and remember the outcome under the req.
-- gift_land (the creator's partition) then credits the creator, or voids the transfer.
--
-- KEYS[1] viewer wallet (its "rl" field is the gift rate bucket, "<tokens> <ms>")
-- KEYS[2] req outcome   KEYS[3] daily spend counter   KEYS[4] ledger stream
-- KEYS[5] ledger entry counter   KEYS[6] viewer account index   KEYS[7] outbox
-- KEYS[8] sync counter
-- (The viewer's display name is kept when the viewer joins a room, not per gift.)
-- ARGV[1] user id   ARGV[2] the req's fingerprint ("<room>|<gift>|<count>")   ARGV[3] adult 1|0
-- ARGV[4] room id   ARGV[5] req   ARGV[6] cost (gift coins x count)
-- ARGV[7] the rest of the transfer record: its JSON members after "xfer" and "ts", closing
--         brace included (ledger.py builds it)
-- ARGV[8] rate/s   ARGV[9] burst   ARGV[10] daily cap (0 = off)
-- ARGV[11] the room's creator ('' for no such room)   ARGV[12] this partition's number
-- Returns {'', balance after, 0, transfer id, ts}; a replay (the req seen before) returns
-- {the first call's transfer record (JSON), its balance, 1, '', 0}, and the caller lands
-- it again (idempotent).
-- Errors: idempotency_conflict, stream_not_live (no such room), not_adult, self_gift,
-- insufficient_funds, rate_limited.

local user, room_id, req = ARGV[1], ARGV[4], ARGV[5]
local cost, creator = tonumber(ARGV[6]), ARGV[11]

-- Exactly once: a remembered req returns its first outcome.
local prior = redis.call('GET', KEYS[2])
if prior then
  local sep = string.find(prior, '\n', 1, true)
  if string.sub(prior, 1, sep - 1) ~= ARGV[2] then
    return redis.error_reply('idempotency_conflict')
  end
  local sep2 = string.find(prior, '\n', sep + 1, true)
  synced(KEYS[8])
  return {string.sub(prior, sep2 + 1), tonumber(string.sub(prior, sep + 1, sep2 - 1)), 1, '', 0}
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
local wallet = redis.call('HMGET', KEYS[1], 'coins', 'rl')
local balance = tonumber(wallet[1] or '0')
if balance < cost then
  return redis.error_reply('insufficient_funds')
end
local now = now_ms()
local rate, burst = tonumber(ARGV[8]), tonumber(ARGV[9])
local tokens = burst
if wallet[2] then
  local sep = string.find(wallet[2], ' ', 1, true)
  local last = tonumber(string.sub(wallet[2], sep + 1))
  tokens = math.min(burst, tonumber(string.sub(wallet[2], 1, sep - 1)) + (now - last) * rate / 1000)
end
if tokens < 1 then
  return redis.error_reply('rate_limited')
end
local cap = tonumber(ARGV[10])
local spent = 0
if cap > 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + cost > cap then
    return redis.error_reply('rate_limited daily coin-spend cap reached')
  end
end

-- All checks passed: from here on, only writes.
local left = balance - cost
redis.call('HSET', KEYS[1], 'coins', left, 'rl', (tokens - 1) .. ' ' .. now)
if cap > 0 then
  redis.call('SET', KEYS[3], spent + cost, 'EX', 172800)
end
-- The debit's id names the transfer.
local xfer = fmt(entry(KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[12]), now, 'gift_debit', user,
  'coins', -cost, left, creator, req, room_id, true))
local record = '{"xfer":"' .. xfer .. '","ts":' .. fmt(now) .. ',' .. ARGV[7]
redis.call('HSET', KEYS[7], xfer, record)
redis.call('SET', KEYS[2], ARGV[2] .. '\n' .. fmt(left) .. '\n' .. record, 'EX', 86400)
return {'', left, 0, xfer, now}
