-- Shared helpers, prepended to every script by livegift/scripts.py.
-- Error replies start with a PROTOCOL code ("insufficient_funds ..."); scripts.py maps them.

local function fmt(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function jstr(s)
  return cjson.encode(s)
end

-- One JSON object from a flat array of name, already-JSON-encoded value pairs, in order:
-- obj({'id', jstr(user), 'coins', fmt(n)}) is {"id":"u1","coins":5}.
local function obj(fields)
  local parts = {}
  for i = 1, #fields, 2 do
    parts[#parts + 1] = '"' .. fields[i] .. '":' .. fields[i + 1]
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- A durable room event: "type", "seq" and "ts" first, always in that order and spelling
-- (livegift/events.py head() reads them from the first bytes; emit() below reads "ts"),
-- then fields as in obj(). The type names are livegift.events.DURABLE.
local function event(kind, seq, ts, fields)
  local head = '{"type":"' .. kind .. '","seq":' .. fmt(seq) .. ',"ts":' .. fmt(ts)
  if #fields == 0 then
    return head .. '}'
  end
  return head .. ',' .. string.sub(obj(fields), 2)
end

-- Append one immutable ledger entry to a partition's ledger and index it under its
-- account. PARTITIONS is set by livegift/scripts.py. The entry's id is unique across
-- partitions: n * PARTITIONS + part, n counting the partition's entries from 1.
-- xfer names the gift transfer of gift_debit/gift_credit/gift_refund ('' otherwise; true:
-- this entry's own id, for the debit that starts a transfer). Numbers go to redis.call as
-- numbers: Redis writes integral ones as integers, exactly, with no string.format here.
local function entry(ledger, entry_seq, acct, part, ts, kind, account, asset, amount, balance,
                     counterparty, ref, room, xfer)
  local id = redis.call('INCR', entry_seq) * PARTITIONS + part
  if xfer == true then
    xfer = id
  end
  local sid = redis.call('XADD', ledger, '*', 'id', id, 'ts', ts, 'kind', kind,
    'account', account, 'asset', asset, 'amount', amount, 'balance', balance,
    'counterparty', counterparty, 'ref', ref, 'room', room, 'xfer', xfer)
  redis.call('ZADD', acct, id, sid)
  return id
end

-- A replayed call changes nothing, but writes this partition's sync counter, so that a
-- WAIT after it covers the write it replays (WAIT counts the connection's last write).
local function synced(sync)
  redis.call('INCR', sync)
end

-- Append a durable room event to the room's history and publish it (a shard channel of
-- the room's slot).
-- Keeps at least the last hist_len events and everything newer than hist_ms; events older
-- than 50 * hist_len seqs go whatever their age. Each call looks at the two oldest events
-- (one read) and drops those it may (at most two: twice the rate events arrive).
local function emit(hist, channel, seq, data, now, hist_len, hist_ms)
  redis.call('ZADD', hist, seq, data)
  local old = redis.call('ZRANGE', hist, 0, 1, 'WITHSCORES')
  local drop = 0
  for i = 1, #old, 2 do
    local oseq = tonumber(old[i + 1])
    if oseq > seq - hist_len then
      break
    end
    local ots = tonumber(string.match(old[i], '"ts":(%d+)') or '0')
    if ots >= now - hist_ms and oseq > seq - 50 * hist_len then
      break
    end
    drop = drop + 1
  end
  if drop > 0 then
    redis.call('ZREMRANGEBYRANK', hist, 0, drop - 1)
  end
  redis.call('SPUBLISH', channel, data)
end

-- End a live stream: live=0, a durable stream_ended event to its members, and the room's
-- keys set to expire: its history after hist_ms (it only serves resumes, and an ended room
-- takes no joins), its hash and top gifters after ttl_s (GET /api/streams/{room} shows
-- them until then). Used by stream_end and by stream_start (one live stream per creator).
-- Returns the stream_ended seq.
local function end_stream(room, hist, top, channel, room_id, now, hist_len, hist_ms, ttl_s)
  redis.call('HSET', room, 'live', '0', 'ended', fmt(now))
  local seq = redis.call('HINCRBY', room, 'seq', 1)
  local ended = event('stream_ended', seq, now, {'room', jstr(room_id)})
  emit(hist, channel, seq, ended, now, hist_len, hist_ms)
  redis.call('PEXPIRE', hist, math.min(hist_ms, ttl_s * 1000))
  redis.call('EXPIRE', room, ttl_s)
  redis.call('EXPIRE', top, ttl_s)
  return seq
end
