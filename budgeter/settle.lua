--[[ settle.lua — replace reservations by what was really spent, exactly once.
-- needs: lua_periods.lua
A reservation that is no longer in KEYS[3] was settled (or reaped) before: nothing happens.

KEYS[1] buckets        hash  [m:<model>:]rpm|itpm|otpm -> GCRA theoretical arrival time (ms)
KEYS[2] budget         hash  <counter>:id, <counter>:used, <counter>:reserved (see reserve.lua;
                             usd counters are refunded and charged in US dollars)
KEYS[3] resv           hash  reservation id -> reservation JSON (written by reserve.lua)
KEYS[4] resv_deadline  zset  reservation id -> deadline (ms)
KEYS[5] resv_sent      hash  reservation id -> 1 once the upstream may have been called
KEYS[6] usage          hash  <period>:<period id>:<model>:<kind> -> tokens (kind usd: dollars)
KEYS[7] state          hash  waiting_settle flag
ARGV[1] mode: 'usage'   ARGV[3] id, ARGV[4] input, ARGV[5] output,
                        ARGV[6] cache_creation_input, ARGV[7] cache_read_input tokens
              'full'    ARGV[3] id: charge the whole reservation (upstream may have served it)
              'release' ARGV[3] id: charge nothing (the upstream was never called)
              'reap'    ARGV[3] max reservations: every reservation past its deadline is
                        charged in full if marked sent, else released
ARGV[2] now in ms, or '' to use Redis server TIME

Returns {settled, waiting_settle, charged_full, released, actual_tokens, reserved_tokens}
  settled: reservations settled by this call (0: already settled)
  waiting_settle: 1 when a DEFER was waiting for in-flight work to settle (flag cleared)
]]
local mode = ARGV[1]
local now = server_now(ARGV[2])

local function settle_one(id, kind, a_in, a_out, a_cc, a_cr)
  local raw = redis.call('HGET', KEYS[3], id)
  if not raw then return false, 0, 0 end
  local r = cjson.decode(raw)
  local est = r.i + r.o
  if kind == 'full' then
    a_in, a_out, a_cc, a_cr = r.i, r.o, 0, 0
  elseif kind == 'release' then
    a_in, a_out, a_cc, a_cr = 0, 0, 0, 0
  end
  local total_in = a_in + a_cc + a_cr
  local total = total_in + a_out
  local usd = 0
  if r.p then
    local p = {}
    for x in string.gmatch(r.p, '%S+') do p[#p + 1] = tonumber(x) end
    if kind == 'full' then
      usd = r.u
    else
      usd = (a_in * p[1] + a_out * p[2] + a_cc * p[3] + a_cr * p[4]) / 1000000
    end
  end

  for bucket, interval in pairs(r.r) do
    local delta = 0
    local what = string.match(bucket, '([^:]+)$')
    if what == 'itpm' then delta = total_in - r.i
    elseif what == 'otpm' then delta = a_out - r.o
    elseif kind == 'release' then delta = -1 end
    if delta ~= 0 then
      local tat = tonumber(redis.call('HGET', KEYS[1], bucket))
      if tat then redis.call('HSET', KEYS[1], bucket, fmt(tat + delta * interval)) end
    end
  end

  for per, pid in pairs(r.b) do
    local cur = redis.call('HMGET', KEYS[2], per .. ':id', per .. ':used', per .. ':reserved')
    if cur[1] == pid then
      local reserved = (tonumber(cur[3]) or 0) - est
      if reserved < 0 then reserved = 0 end
      redis.call('HSET', KEYS[2], per .. ':used', (tonumber(cur[2]) or 0) + total,
        per .. ':reserved', reserved)
    end
  end

  for per, pid in pairs(r.d or {}) do
    local cur = redis.call('HMGET', KEYS[2], per .. ':id', per .. ':used', per .. ':reserved')
    if cur[1] == pid then
      local reserved = (tonumber(cur[3]) or 0) - r.u
      if reserved < 0.0000005 then reserved = 0 end
      redis.call('HSET', KEYS[2], per .. ':used', fmt6((tonumber(cur[2]) or 0) + usd),
        per .. ':reserved', fmt6(reserved))
    end
  end

  if kind ~= 'release' then
    local amounts = {input = a_in, output = a_out, cache_creation = a_cc, cache_read = a_cr,
      requests = 1}
    for _, per in ipairs({'day', 'month', 'total'}) do
      local pid = period_of(per, r.t)
      for what, n in pairs(amounts) do
        if n > 0 then
          redis.call('HINCRBY', KEYS[6], per .. ':' .. pid .. ':' .. r.m .. ':' .. what, n)
        end
      end
      if usd > 0 then
        redis.call('HINCRBYFLOAT', KEYS[6], per .. ':' .. pid .. ':' .. r.m .. ':usd', fmt6(usd))
      end
    end
  end

  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  return true, total, est
end

local settled, full, released, actual, reserved = 0, 0, 0, 0, 0
local function tally(kind, ok, a, e)
  if ok then
    settled = settled + 1
    actual = actual + a
    reserved = reserved + e
    if kind == 'full' then full = full + 1 elseif kind == 'release' then released = released + 1 end
  end
end

if mode == 'usage' then
  local ok, a, e = settle_one(ARGV[3], 'usage', tonumber(ARGV[4]), tonumber(ARGV[5]),
    tonumber(ARGV[6]), tonumber(ARGV[7]))
  tally('usage', ok, a, e)
elseif mode == 'full' or mode == 'release' then
  local ok, a, e = settle_one(ARGV[3], mode)
  tally(mode, ok, a, e)
elseif mode == 'reap' then
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
  for _, id in ipairs(due) do
    local kind = 'release'
    if redis.call('HEXISTS', KEYS[5], id) == 1 then kind = 'full' end
    local ok, a, e = settle_one(id, kind)
    if not ok then redis.call('ZREM', KEYS[4], id) end
    tally(kind, ok, a, e)
  end
else
  return redis.error_reply('settle.lua: unknown mode ' .. tostring(mode))
end

local waiting = 0
if settled > 0 and redis.call('HDEL', KEYS[7], 'waiting_settle') == 1 then waiting = 1 end
return {settled, waiting, full, released, actual, reserved}
