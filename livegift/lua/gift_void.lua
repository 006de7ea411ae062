-- gift_void: step 3 of a gift that could not land (gift_land answered "void"), in the
-- viewer's partition: the coins go back to the viewer with a gift_refund entry, and the
-- transfer leaves the outbox. Once only: a transfer no longer in the outbox was refunded.
--
-- KEYS[1] viewer wallet   KEYS[2] outbox   KEYS[3] ledger stream   KEYS[4] ledger entry counter
-- KEYS[5] viewer account index   KEYS[6] sync counter
-- KEYS[7] the viewer's daily spend counter of the day the gift was sent (given back too)
-- ARGV[1] transfer id   ARGV[2] this partition's number
-- Returns: 1 when this call refunded, 0 when it had been done.

local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then
  synced(KEYS[6])
  return 0
end
local t = cjson.decode(raw)
local cost = tonumber(t.cost)
local left = redis.call('HINCRBY', KEYS[1], 'coins', cost)
entry(KEYS[3], KEYS[4], KEYS[5], tonumber(ARGV[2]), now_ms(), 'gift_refund', t.user, 'coins',
  cost, left, t.creator, t.req, t.room, t.xfer)
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[7]) == 1 then
  redis.call('DECRBY', KEYS[7], cost)
end
return 1
