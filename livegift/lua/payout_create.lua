-- payout_create: a creator cashes out diamonds; they leave the wallet and are held by the
-- payout until it is settled paid (kept out) or failed (returned by a reversal entry).
--
-- KEYS[1] wallet   KEYS[2] payout hash   KEYS[3] creator's payouts zset
-- KEYS[4] idempotency record (fingerprint, newline, first response)   KEYS[5] today's net cash-out counter   KEYS[6] held counter
-- KEYS[7] ledger stream   KEYS[8] account index   KEYS[9] ledger entry counter
-- KEYS[10] sync counter (all in the creator's partition, which the payout id names)
-- ARGV[1] user   ARGV[2] payout id   ARGV[3] diamonds (= gross cents)   ARGV[4] net
-- ARGV[5] commission   ARGV[6] minimum diamonds   ARGV[7] daily net cap (cents)
-- ARGV[8] request fingerprint   ARGV[9] day (YYYYMMDD)   ARGV[10] idempotency ttl seconds
-- ARGV[11] this partition's number
-- Returns: {payout JSON, replayed 0|1}
-- Errors: idempotency_conflict, bad_request, below_minimum, insufficient_funds, payout_limit.

local prior = redis.call('GET', KEYS[4])
if prior then
  local sep = string.find(prior, '\n', 1, true)
  if string.sub(prior, 1, sep - 1) ~= ARGV[8] then
    return redis.error_reply('idempotency_conflict this Idempotency-Key was used with another body')
  end
  synced(KEYS[10])
  return {string.sub(prior, sep + 1), 1}
end

local gross, net, commission = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if gross ~= net + commission or net < 0 or commission < 0 then
  return redis.error_reply('bad_request payout split does not add up')
end
if gross < tonumber(ARGV[6]) then
  return redis.error_reply('below_minimum the minimum cash-out is ' .. ARGV[6] .. ' diamonds')
end
local diamonds = tonumber(redis.call('HGET', KEYS[1], 'diamonds') or '0')
if diamonds < gross then
  return redis.error_reply('insufficient_funds not enough diamonds')
end
local paid_today = tonumber(redis.call('GET', KEYS[5]) or '0')
if paid_today + net > tonumber(ARGV[7]) then
  return redis.error_reply('payout_limit at most ' .. ARGV[7] .. ' cents net per UTC day')
end

local now = now_ms()
local left = redis.call('HINCRBY', KEYS[1], 'diamonds', -gross)
redis.call('INCRBY', KEYS[5], net)
redis.call('EXPIRE', KEYS[5], 172800)
redis.call('INCRBY', KEYS[6], gross)
entry(KEYS[7], KEYS[9], KEYS[8], tonumber(ARGV[11]), now, 'payout', ARGV[1], 'diamonds', -gross,
  left, 'payouts', ARGV[2], '', '')
local payout = '{"id":' .. jstr(ARGV[2]) .. ',"user":' .. jstr(ARGV[1]) .. ',"diamonds":'
  .. fmt(gross) .. ',"gross":' .. fmt(gross) .. ',"commission":' .. fmt(commission)
  .. ',"net":' .. fmt(net) .. ',"currency":"USD","status":"pending","created":' .. fmt(now)
  .. ',"day":' .. jstr(ARGV[9]) .. '}'
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'user', ARGV[1], 'gross', fmt(gross), 'net', fmt(net),
  'commission', fmt(commission), 'status', 'pending', 'day', ARGV[9], 'created', fmt(now),
  'json', payout)
redis.call('ZADD', KEYS[3], now, ARGV[2])
redis.call('SET', KEYS[4], ARGV[8] .. '\n' .. payout, 'EX', tonumber(ARGV[10]))
return {payout, 0}
