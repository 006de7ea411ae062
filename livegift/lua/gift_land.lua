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
-- The transfer (ledger.py's Transfer), as gift_send recorded it:
-- ARGV[1] transfer id   ARGV[2] viewer   ARGV[3] creator   ARGV[4] room id   ARGV[5] req
-- ARGV[6] ts (ms, the send's)   ARGV[7] cost   ARGV[8] count   ARGV[9] gift id
-- ARGV[10] streakable 1|0
-- ARGV[11] the gift event's JSON after its seq, up to '"combo":' (ledger.py builds it;
--          this script adds the combo and the closing brace)
-- ARGV[12] the viewer as JSON ({"id":..,"name":..}, for an auto shout-out)
-- ARGV[13] combo window ms   ARGV[14] history length   ARGV[15] history ms
-- ARGV[16] the room's channel   ARGV[17] auto shout-out min coins (0 = off)
-- ARGV[18] auto shout-out text   ARGV[19] this partition's number
-- Returns: "<seq> <combo>", or "void".

local prior = redis.call('GET', KEYS[9])
if prior then
  synced(KEYS[10])
  return prior
end

local user, creator, room_id, gift = ARGV[2], ARGV[3], ARGV[4], ARGV[9]
local room = redis.call('HMGET', KEYS[2], 'live', 'creator', 'seq', 'coins', 'gifts')
if room[1] ~= '1' or room[2] ~= creator then
  redis.call('SET', KEYS[9], 'void', 'EX', 90000)
  return 'void'
end

-- The gift's time is when it was sent (the debit's): its event's ts, and its streak's.
local now = tonumber(ARGV[6])
local cost, count = tonumber(ARGV[7]), tonumber(ARGV[8])
local diamonds = redis.call('HINCRBY', KEYS[1], 'diamonds', cost)
entry(KEYS[6], KEYS[7], KEYS[8], tonumber(ARGV[19]), now, 'gift_credit', creator, 'diamonds',
  cost, diamonds, user, ARGV[5], room_id, ARGV[1])

local combo = count
if ARGV[10] == '1' then
  local window = tonumber(ARGV[13])
  local state = redis.call('GET', KEYS[3])
  if state then
    local was_gift, was, at = string.match(state, '^(%S+) (%d+) (%d+)$')
    if was_gift == gift and now - tonumber(at) <= window then
      combo = tonumber(was) + count
    end
  end
  redis.call('SET', KEYS[3], gift .. ' ' .. fmt(combo) .. ' ' .. fmt(now), 'PX', window + 1000)
else
  redis.call('DEL', KEYS[3])
end

local seq = tonumber(room[3] or '0') + 1
redis.call('ZINCRBY', KEYS[4], cost, user)
local hist_len, hist_ms = tonumber(ARGV[14]), tonumber(ARGV[15])
emit(KEYS[5], ARGV[16], seq, '{"type":"gift","seq":' .. fmt(seq) .. ARGV[11] .. fmt(combo) .. '}',
  now, hist_len, hist_ms)

local last = seq
local auto_min = tonumber(ARGV[17])
if auto_min > 0 and cost >= auto_min then
  last = seq + 1
  local shout = event('shoutout', last, now, {
    'room', jstr(room_id), 'to', ARGV[12], 'text', jstr(ARGV[18]), 'auto', 'true',
  })
  emit(KEYS[5], ARGV[16], last, shout, now, hist_len, hist_ms)
end
redis.call('HSET', KEYS[2], 'seq', last, 'coins', tonumber(room[4] or '0') + cost,
  'gifts', tonumber(room[5] or '0') + 1)

local outcome = fmt(seq) .. ' ' .. fmt(combo)
redis.call('SET', KEYS[9], outcome, 'EX', 90000)
return outcome
