--[[ reserve.lua — check and reserve every limit of one tenant in one atomic call.
-- needs: lua_periods.lua
All keys carry the tenant's hash tag, so the call is correct on Redis Cluster.

KEYS[1] policy         hash  flattened TenantPolicy (budget:<period>, rate:<kind>, max_concurrency, on_exhausted)
KEYS[2] buckets        hash  rpm|itpm|otpm -> theoretical arrival time (ms) of the GCRA bucket
KEYS[3] budget         hash  <period>:id, <period>:used, <period>:reserved
KEYS[4] resv           hash  reservation id -> reservation JSON
KEYS[5] resv_deadline  zset  reservation id -> deadline (ms) for the reaper
KEYS[6] state          hash  waiting_settle flag
KEYS[7] recent         list  the last 20 decisions, newest first: '<now ms> <decision> <reason> <tokens>'
ARGV[1] reservation id (idempotent: a second call with the same id answers ADMIT)
ARGV[2] input tokens (count_tokens)
ARGV[3] max_tokens
ARGV[4] now in ms, or '' to use Redis server TIME
ARGV[5] hold ms: the reservation's deadline is now + hold
ARGV[6] model (recorded with the reservation for usage accounting)

Returns {decision, until_ms, reason, now_ms, detail}
  'ADMIT'  0        ''
  'DEFER'  until    'rate:<kind>' (until = first ms the bucket holds the request),
                    'concurrency' | 'inflight:<period>' (until 0 = when in-flight work settles),
                    'exhausted:<period>' (policy on_exhausted=wait; until = period reset)
  'REJECT' reset    'exhausted:<period>' (used alone leaves no room; reset 0 = never),
                    'too_large:budget:<period>' | 'too_large:rate:<kind>' | 'unknown_tenant'
  detail: '<used>/<limit>' or '<cost>/<limit>' for REJECT, '' otherwise
]]
local id = ARGV[1]
local input = tonumber(ARGV[2])
local output = tonumber(ARGV[3])
local now = server_now(ARGV[4])
local hold = tonumber(ARGV[5])
local model = ARGV[6]

local function answer(decision, until_ms, reason, detail)
  if KEYS[7] then
    redis.call('LPUSH', KEYS[7], string.format('%d %s %s %d', now, decision,
      reason ~= '' and reason or '-', input + output))
    redis.call('LTRIM', KEYS[7], 0, 19)
  end
  return {decision, until_ms, reason, now, detail}
end

if redis.call('HEXISTS', KEYS[4], id) == 1 then
  return answer('ADMIT', 0, 'already_reserved', '')
end

local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then return {'REJECT', 0, 'unknown_tenant', now, ''} end
local pol = {}
for i = 1, #flat, 2 do pol[flat[i]] = flat[i + 1] end

local est = input + output
local settle_wait, wait_reason = false, nil
local exhausted_until, exhausted_reason = 0, nil

-- 1. calendar budgets
local budgets = {}
for _, per in ipairs({'minute', 'hour', 'day', 'month', 'total'}) do
  local limit = tonumber(pol['budget:' .. per])
  if limit then
    local pid, reset = period_of(per, now)
    local cur = redis.call('HMGET', KEYS[3], per .. ':id', per .. ':used', per .. ':reserved')
    local used, reserved = 0, 0
    if cur[1] == pid then
      used = tonumber(cur[2]) or 0
      reserved = tonumber(cur[3]) or 0
    end
    if est > limit then
      return answer('REJECT', 0, 'too_large:budget:' .. per, est .. '/' .. limit)
    end
    if used + est > limit then
      if pol['on_exhausted'] == 'wait' and reset > 0 then
        if reset > exhausted_until then exhausted_until, exhausted_reason = reset, 'exhausted:' .. per end
      else
        return answer('REJECT', reset, 'exhausted:' .. per, used .. '/' .. limit)
      end
    elseif used + reserved + est > limit then
      settle_wait = true
      wait_reason = wait_reason or ('inflight:' .. per)
    end
    budgets[per] = {pid, used, reserved}
  end
end

-- 2. concurrency: the reservations in flight
local max_conc = tonumber(pol['max_concurrency'])
if max_conc and redis.call('HLEN', KEYS[4]) >= max_conc then
  settle_wait = true
  wait_reason = wait_reason or 'concurrency'
end

-- 3. per-minute buckets (GCRA: capacity one minute of tokens, continuous refill)
local kinds = {'rpm', 'itpm', 'otpm'}
local costs = {rpm = 1, itpm = input, otpm = output}
local tats = redis.call('HMGET', KEYS[2], 'rpm', 'itpm', 'otpm')
local new_tats, intervals = {}, {}
local rate_until, rate_reason = 0, nil
for i, kind in ipairs(kinds) do
  local limit = tonumber(pol['rate:' .. kind])
  if limit then
    local cost = costs[kind]
    if cost > limit then
      return answer('REJECT', 0, 'too_large:rate:' .. kind, cost .. '/' .. limit)
    end
    local interval = 60000 / limit
    local tat = tonumber(tats[i]) or now
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    if new_tat - now > 60000 then
      local fits_at = math.ceil(new_tat - 60000)
      if fits_at > rate_until then rate_until, rate_reason = fits_at, 'rate:' .. kind end
    end
    new_tats[kind] = new_tat
    intervals[kind] = interval
  end
end

if exhausted_reason then
  return answer('DEFER', exhausted_until, exhausted_reason, '')
end
if rate_until > 0 or settle_wait then
  if settle_wait then redis.call('HSET', KEYS[6], 'waiting_settle', '1') end
  return answer('DEFER', rate_until, rate_reason or wait_reason, '')
end

-- ADMIT: apply every limit
for kind, tat in pairs(new_tats) do redis.call('HSET', KEYS[2], kind, fmt(tat)) end
local periods = {}
for per, b in pairs(budgets) do
  redis.call('HSET', KEYS[3], per .. ':id', b[1], per .. ':used', b[2], per .. ':reserved', b[3] + est)
  periods[per] = b[1]
end
local rec = cjson.encode({i = input, o = output, m = model, t = now, b = periods, r = intervals})
redis.call('HSET', KEYS[4], id, rec)
redis.call('ZADD', KEYS[5], now + hold, id)
return answer('ADMIT', 0, '', '')
