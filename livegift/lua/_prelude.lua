-- Shared helpers, prepended to every script by livegift/ledger.py.
-- Error replies are a bare PROTOCOL code ("insufficient_funds"); ledger.py maps them.

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

-- Append one immutable ledger entry and index it under its account.
local function entry(ledger, entry_seq, acct, ts, kind, account, asset, amount, balance,
                     counterparty, ref, room)
  local n = redis.call('INCR', entry_seq)
  local sid = redis.call('XADD', ledger, '*', 'id', fmt(n), 'ts', fmt(ts), 'kind', kind,
    'account', account, 'asset', asset, 'amount', fmt(amount), 'balance', fmt(balance),
    'counterparty', counterparty, 'ref', ref, 'room', room)
  redis.call('ZADD', acct, n, sid)
  return n
end

-- Append a durable room event to the room's history and publish it.
-- Keeps at least the last hist_len events and everything newer than hist_ms.
local function emit(hist, channel, seq, event, now, hist_len, hist_ms)
  redis.call('ZADD', hist, seq, event)
  for _ = 1, 2 do
    local oldest = redis.call('ZRANGE', hist, 0, 0, 'WITHSCORES')
    if not oldest[2] or tonumber(oldest[2]) > seq - hist_len then
      break
    end
    local ots = tonumber(string.match(oldest[1], '"ts":(%d+)') or '0')
    if ots >= now - hist_ms and tonumber(oldest[2]) > seq - 50 * hist_len then
      break
    end
    redis.call('ZREMRANGEBYRANK', hist, 0, 0)
  end
  redis.call('PUBLISH', channel, event)
end
