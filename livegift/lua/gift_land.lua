-- gift_land: step 2 of a gift, in the creator's partition (the room's). Applies a
-- transfer recorded by gift_send exactly once, keyed by its id: credit the creator's
-- diamonds, write the gift_credit entry, assign the seq and the combo, append the gift
-- event to the room's history and publish it. When the room is no longer live (or is not
-- the creator's), the transfer is void: nothing moves here, and the caller returns the
-- coins with gift_void. Either outcome is kept under the transfer id for 25 hours, longer
-- than a req is remembered, so every later call answers the same.
--
-- KEYS[1] creator wallet   KEYS[2] room hash   KEYS[3] combo state ("<gift> <combo> <ms>")
-- KEYS[4] room top zset
-- KEYS[5] room history   KEYS[6] ledger stream   KEYS[7] ledger entry counter
-- KEYS[8] creator account index   KEYS[9] the transfer's outcome   KEYS[10] sync counter
-- ARGV[1] the transfer JSON (gift_send's)   ARGV[2] combo window ms   ARGV[3] history length
-- ARGV[4] history ms   ARGV[5] the room's channel
-- ARGV[6] auto shout-out min coins (0 = off)   ARGV[7] auto shout-out text
-- ARGV[8] this partition's number
-- Returns: "<seq> <combo>", or "void".

local prior = redis.call('GET', KEYS[9])
if prior then
  synced(KEYS[10])
  return prior
end

local t = cjson.decode(ARGV[1])
local room = redis.call('HMGET', KEYS[2], 'live', 'creator')
if room[1] ~= '1' or room[2] ~= t.creator then
  redis.call('SET', KEYS[9], 'void', 'EX', 90000)
  return 'void'
end

-- The gift's time is when it was sent (the debit's): its event's ts, and its streak's.
local now = tonumber(t.ts)
local cost, count = tonumber(t.cost), tonumber(t.count)
local diamonds = redis.call('HINCRBY', KEYS[1], 'diamonds', cost)
entry(KEYS[6], KEYS[7], KEYS[8], tonumber(ARGV[8]), now, 'gift_credit', t.creator, 'diamonds',
  cost, diamonds, t.user, t.req, t.room, t.xfer)

local combo = count
local window = tonumber(ARGV[2])
if t.streakable then
  local state = redis.call('GET', KEYS[3])
  if state then
    local gift, was, at = string.match(state, '^(%S+) (%d+) (%d+)$')
    if gift == t.gift and now - tonumber(at) <= window then
      combo = tonumber(was) + count
    end
  end
  redis.call('SET', KEYS[3], t.gift .. ' ' .. fmt(combo) .. ' ' .. fmt(now), 'PX', window + 1000)
else
  redis.call('DEL', KEYS[3])
end

local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('HINCRBY', KEYS[2], 'coins', cost)
redis.call('HINCRBY', KEYS[2], 'gifts', 1)
redis.call('ZINCRBY', KEYS[4], cost, t.user)
local hist_len, hist_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local from = obj({'id', jstr(t.user), 'name', jstr(t.name)})
local sent = event('gift', seq, now, {
  'room', jstr(t.room),
  'from', from,
  'gift', obj({'id', jstr(t.gift), 'name', jstr(t.gift_name), 'coins', fmt(t.gift_coins)}),
  'count', fmt(count),
  'coins', fmt(cost),
  'combo', fmt(combo),
})
emit(KEYS[5], ARGV[5], seq, sent, now, hist_len, hist_ms)

local auto_min = tonumber(ARGV[6])
if auto_min > 0 and cost >= auto_min then
  local sseq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
  local shout = event('shoutout', sseq, now, {
    'room', jstr(t.room), 'to', from, 'text', jstr(ARGV[7]), 'auto', 'true',
  })
  emit(KEYS[5], ARGV[5], sseq, shout, now, hist_len, hist_ms)
end

local outcome = fmt(seq) .. ' ' .. fmt(combo)
redis.call('SET', KEYS[9], outcome, 'EX', 90000)
return outcome
