-- gift: a viewer sends count x gift to a live room, atomically.
-- Checks everything before the first write; a failed gift changes nothing.
--
-- KEYS[1]  viewer wallet        KEYS[2]  creator wallet     KEYS[3]  room hash
-- KEYS[4]  req outcome          KEYS[5]  combo state        KEYS[6]  room top zset
-- KEYS[7]  room history         KEYS[8]  ledger stream      KEYS[9]  viewer account index
-- KEYS[10] creator acct index   KEYS[11] rate bucket        KEYS[12] daily spend counter
-- KEYS[13] viewer name          KEYS[14] ledger entry counter
-- ARGV[1] user id   ARGV[2] user name   ARGV[3] adult 1|0   ARGV[4] room id   ARGV[5] req
-- ARGV[6] gift id   ARGV[7] gift name   ARGV[8] gift coins  ARGV[9] streakable 1|0
-- ARGV[10] count    ARGV[11] rate/s     ARGV[12] burst      ARGV[13] daily cap (0 = off)
-- ARGV[14] auto shout-out min coins (0 = off)               ARGV[15] auto shout-out text
-- ARGV[16] combo window ms   ARGV[17] history length   ARGV[18] history ms   ARGV[19] channel
-- ARGV[20] creator id (the owner of KEYS[2]; must be the room's creator)
-- Returns: JSON '{"balance":B,"seq":S,"combo":K,"replay":false}' (replay true on a retry);
-- error replies: idempotency_conflict, not_adult, stream_not_live, self_gift,
-- insufficient_funds, rate_limited.

local user, uname, room_id, req = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local gift_id, gift_name = ARGV[6], ARGV[7]
local gift_coins, count = tonumber(ARGV[8]), tonumber(ARGV[10])
local fingerprint = room_id .. '|' .. gift_id .. '|' .. ARGV[10]

-- Exactly once: a remembered req returns its first outcome.
local prior = redis.call('GET', KEYS[4])
if prior then
  local sep = string.find(prior, '\n', 1, true)
  if string.sub(prior, 1, sep - 1) ~= fingerprint then
    return redis.error_reply('idempotency_conflict')
  end
  return (string.gsub(string.sub(prior, sep + 1), '"replay":false', '"replay":true'))
end

if ARGV[3] ~= '1' then
  return redis.error_reply('not_adult')
end
local room = redis.call('HMGET', KEYS[3], 'live', 'creator')
if room[1] ~= '1' then
  return redis.error_reply('stream_not_live')
end
local creator = room[2]
if creator ~= ARGV[20] then
  return redis.error_reply('internal creator wallet key does not match the room')
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
local bucket = redis.call('HMGET', KEYS[11], 'tokens', 'ts')
local tokens = burst
if bucket[1] then
  tokens = math.min(burst, tonumber(bucket[1]) + (now - tonumber(bucket[2])) * rate / 1000)
end
if tokens < 1 then
  return redis.error_reply('rate_limited')
end
local cap = tonumber(ARGV[13])
local spent = 0
if cap > 0 then
  spent = tonumber(redis.call('GET', KEYS[12]) or '0')
  if spent + cost > cap then
    return redis.error_reply('rate_limited daily coin-spend cap reached')
  end
end

-- All checks passed: from here on, only writes.
redis.call('HSET', KEYS[11], 'tokens', tostring(tokens - 1), 'ts', fmt(now))
redis.call('PEXPIRE', KEYS[11], math.ceil(burst * 1000 / rate) + 1000)
if cap > 0 then
  redis.call('INCRBY', KEYS[12], cost)
  redis.call('EXPIRE', KEYS[12], 172800)
end
redis.call('SET', KEYS[13], uname)
local left = redis.call('HINCRBY', KEYS[1], 'coins', -cost)
local diamonds = redis.call('HINCRBY', KEYS[2], 'diamonds', cost)
entry(KEYS[8], KEYS[14], KEYS[9], now, 'gift_debit', user, 'coins', -cost, left, creator, req, room_id)
entry(KEYS[8], KEYS[14], KEYS[10], now, 'gift_credit', creator, 'diamonds', cost, diamonds, user,
  req, room_id)

local combo = count
if ARGV[9] == '1' then
  local state = redis.call('HMGET', KEYS[5], 'gift', 'combo', 'ts')
  if state[1] == gift_id and now - tonumber(state[3]) <= tonumber(ARGV[16]) then
    combo = tonumber(state[2]) + count
  end
  redis.call('HSET', KEYS[5], 'gift', gift_id, 'combo', fmt(combo), 'ts', fmt(now))
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[16]) + 1000)
else
  redis.call('DEL', KEYS[5])
end

local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
redis.call('HINCRBY', KEYS[3], 'coins', cost)
redis.call('HINCRBY', KEYS[3], 'gifts', 1)
redis.call('ZINCRBY', KEYS[6], cost, user)
local hist_len, hist_ms = tonumber(ARGV[17]), tonumber(ARGV[18])
local from = obj({'id', jstr(user), 'name', jstr(uname)})
local sent = event('gift', seq, now, {
  'room', jstr(room_id),
  'from', from,
  'gift', obj({'id', jstr(gift_id), 'name', jstr(gift_name), 'coins', fmt(gift_coins)}),
  'count', fmt(count),
  'coins', fmt(cost),
  'combo', fmt(combo),
})
emit(KEYS[7], ARGV[19], seq, sent, now, hist_len, hist_ms)

local auto_min = tonumber(ARGV[14])
if auto_min > 0 and cost >= auto_min then
  local sseq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
  local shout = event('shoutout', sseq, now, {
    'room', jstr(room_id), 'to', from, 'text', jstr(ARGV[15]), 'auto', 'true',
  })
  emit(KEYS[7], ARGV[19], sseq, shout, now, hist_len, hist_ms)
end

local outcome = '{"balance":' .. fmt(left) .. ',"seq":' .. fmt(seq) .. ',"combo":' .. fmt(combo)
  .. ',"replay":false}'
redis.call('SET', KEYS[4], fingerprint .. '\n' .. outcome, 'EX', 86400)
return outcome
