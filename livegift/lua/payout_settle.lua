-- payout_settle: an operator marks a pending payout paid, or failed (diamonds go back).
--
-- KEYS[1] payout hash   KEYS[2] creator wallet   KEYS[3] held counter   KEYS[4] ledger stream
-- KEYS[5] account index   KEYS[6] ledger entry counter   KEYS[7] the payout day's net counter
-- KEYS[8] sync counter (all in the creator's partition)
-- ARGV[1] outcome: paid | failed   ARGV[2] creator id (must own the payout)
-- ARGV[3] this partition's number
-- Returns: the payout JSON after settling, with "settled" (ms); unchanged when already
-- settled that way.
-- Errors: not_found, bad_request (already settled the other way).

local p = redis.call('HMGET', KEYS[1], 'status', 'user', 'gross', 'net', 'json', 'id')
if not p[1] then
  return redis.error_reply('not_found no such payout')
end
if p[2] ~= ARGV[2] then
  return redis.error_reply('bad_request payout belongs to another user')
end
if p[1] == ARGV[1] then
  synced(KEYS[8])
  return p[5]
end
if p[1] ~= 'pending' then
  return redis.error_reply('bad_request payout is already ' .. p[1])
end
local gross, net = tonumber(p[3]), tonumber(p[4])
local now = now_ms()
local payout = string.gsub(p[5], '"status":"pending"',
  '"status":"' .. ARGV[1] .. '","settled":' .. fmt(now))
if ARGV[1] == 'failed' then
  local left = redis.call('HINCRBY', KEYS[2], 'diamonds', gross)
  redis.call('DECRBY', KEYS[3], gross)
  if redis.call('EXISTS', KEYS[7]) == 1 then
    redis.call('DECRBY', KEYS[7], net)
  end
  entry(KEYS[4], KEYS[6], KEYS[5], tonumber(ARGV[3]), now, 'payout_reversal', p[2], 'diamonds',
    gross, left, 'payouts', p[6], '', '')
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'settled', fmt(now), 'json', payout)
return payout
