-- recharge: credit the coins of a verified store receipt, once per txn.
--
-- KEYS[1] wallet   KEYS[2] txn record   KEYS[3] minted counter   KEYS[4] ledger stream
-- KEYS[5] account index   KEYS[6] ledger entry counter   KEYS[7] sync counter
-- (all in the buyer's partition; livegift.ledger claims the txn for the buyer first)
-- ARGV[1] user   ARGV[2] txn   ARGV[3] coins   ARGV[4] amount   ARGV[5] currency
-- ARGV[6] package   ARGV[7] region   ARGV[8] who sold the coins: 'store', or 'sandbox' for a
-- sandbox receipt (the purchase entry's counterparty; the transaction gets "sandbox":true)
-- ARGV[9] this partition's number
-- Returns: {transaction JSON, coins, diamonds, replayed 0|1}
-- Errors: invalid_receipt (the txn was credited to another user).

local prior = redis.call('GET', KEYS[2])
if prior then
  local owner = cjson.decode(prior)['user']
  if owner ~= ARGV[1] then
    return redis.error_reply('invalid_receipt this receipt was already used by another user')
  end
  local w = redis.call('HMGET', KEYS[1], 'coins', 'diamonds')
  synced(KEYS[7])
  return {prior, tonumber(w[1] or '0'), tonumber(w[2] or '0'), 1}
end

local seller = ARGV[8]
if seller ~= 'store' and seller ~= 'sandbox' then
  return redis.error_reply('internal unknown seller')
end
local coins = tonumber(ARGV[3])
local now = now_ms()
local balance = redis.call('HINCRBY', KEYS[1], 'coins', coins)
redis.call('INCRBY', KEYS[3], coins)
local n = entry(KEYS[4], KEYS[6], KEYS[5], tonumber(ARGV[9]), now, 'purchase', ARGV[1], 'coins',
  coins, balance, seller, ARGV[2], '', '')
local txn = '{"id":' .. jstr('t' .. fmt(n)) .. ',"txn":' .. jstr(ARGV[2]) .. ',"user":'
  .. jstr(ARGV[1]) .. ',"coins":' .. fmt(coins) .. ',"amount":' .. fmt(tonumber(ARGV[4]))
  .. ',"currency":' .. jstr(ARGV[5]) .. ',"package":' .. jstr(ARGV[6]) .. ',"region":'
  .. jstr(ARGV[7]) .. ',"ts":' .. fmt(now) .. (seller == 'sandbox' and ',"sandbox":true' or '')
  .. '}'
redis.call('SET', KEYS[2], txn)
local diamonds = tonumber(redis.call('HGET', KEYS[1], 'diamonds') or '0')
return {txn, balance, diamonds, 0}
