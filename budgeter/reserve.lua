--[[ reserve.lua — check and reserve every limit of one scope in one atomic call.
-- needs: lua_periods.lua
A scope is a tenant ({t:<tenant>}) or one model of the upstream account ({g:<digest>}).
All keys carry the scope's hash tag, so the call is correct on Redis Cluster.

KEYS[1] policy         hash  flattened policy (budget:<period>, usd:<period>, rate:<kind>,
                             m:<model>:<same>, allowlist, allow:<model>, max_concurrency,
                             on_exhausted); not read when ARGV[7] gives the policy
KEYS[2] buckets        hash  [m:<model>:]rpm|itpm|otpm -> GCRA theoretical arrival time (ms)
KEYS[3] budget         hash  <counter>:id, <counter>:used, <counter>:reserved where counter
                             is [m:<model>:][usd:]<period> (usd counters in US dollars)
KEYS[4] resv           hash  reservation id -> reservation JSON
KEYS[5] resv_deadline  zset  reservation id -> deadline (ms) for the reaper
KEYS[6] state          hash  waiting_settle flag; paused_until (ms): DEFER everything until then
KEYS[7] recent         list  (optional) the last 20 decisions: '<now ms> <decision> <reason> <tokens>'
KEYS[8] resv_sent      hash  (optional) reservation id -> 1, written at once when ARGV[8] = '1'
ARGV[1] reservation id (idempotent: a second call with the same id answers ADMIT)
ARGV[2] input tokens (count_tokens)
ARGV[3] max_tokens
ARGV[4] now in ms, or '' to use Redis server TIME
ARGV[5] hold ms: the reservation's deadline is now + hold
ARGV[6] model (its m:<model>: limits apply too; recorded for usage accounting)
ARGV[7] the flat policy as a JSON object, or '' to read KEYS[1] ('' policy hash: unknown)
ARGV[8] '1': mark the reservation sent at once (the reaper then charges it in full)
ARGV[9] the model's prices 'input output cache_write cache_read' in USD per million
        tokens, or '' (then a usd budget refuses the request: 'unpriced_model')

Returns {decision, until_ms, reason, now_ms, detail}
  'ADMIT'  0        ''
  'DEFER'  until    'rate:<kind>' | 'model:rate:<kind>' (until = first ms the bucket holds it),
                    'paused' (until = paused_until),
                    'concurrency' | 'inflight:<counter>' (until 0 = when in-flight work settles),
                    'exhausted:<counter>' (policy on_exhausted=wait; until = period reset)
  'REJECT' reset    'exhausted:<counter>' (used alone leaves no room; reset 0 = never),
                    'too_large:budget:<counter>' | 'too_large:rate:<kind>' | 'unknown_tenant' |
                    'model_not_allowed' | 'unpriced_model'
  where <counter> is [model:][usd:]<period> (the model's name is never part of a reason)
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

local pol = {}
if ARGV[7] ~= nil and ARGV[7] ~= '' then
  pol = cjson.decode(ARGV[7])
else
  local flat = redis.call('HGETALL', KEYS[1])
  if #flat == 0 then return {'REJECT', 0, 'unknown_tenant', now, ''} end
  for i = 1, #flat, 2 do pol[flat[i]] = flat[i + 1] end
end

if pol['allowlist'] and not pol['allow:' .. model] then
  return answer('REJECT', 0, 'model_not_allowed', model)
end

local paused = tonumber(redis.call('HGET', KEYS[6], 'paused_until'))
if paused and paused > now then
  return answer('DEFER', paused, 'paused', '')
end

local prices = nil
if ARGV[9] ~= nil and ARGV[9] ~= '' then
  prices = {}
  for x in string.gmatch(ARGV[9], '%S+') do prices[#prices + 1] = tonumber(x) end
end

local est = input + output
local usd_est = 0
if prices then
  usd_est = (input * math.max(prices[1], prices[3]) + output * prices[2]) / 1000000
end
local settle_wait, wait_reason = false, nil
local exhausted_until, exhausted_reason = 0, nil

-- the scopes of limits: the policy's own, then the model's ('m:<model>:' fields)
local scopes = {{'', ''}}
if model ~= '' then scopes[2] = {'m:' .. model .. ':', 'model:'} end

-- 1. calendar budgets, in tokens and in dollars
local budgets, dollars = {}, {}
for _, scope in ipairs(scopes) do
  for _, unit in ipairs({'budget:', 'usd:'}) do
    for _, per in ipairs({'minute', 'hour', 'day', 'month', 'total'}) do
      local limit = tonumber(pol[scope[1] .. unit .. per])
      if limit then
        local counter, label, cost = scope[1] .. per, scope[2] .. per, est
        if unit == 'usd:' then
          if not prices then return answer('REJECT', 0, 'unpriced_model', model) end
          counter, label, cost = scope[1] .. 'usd:' .. per, scope[2] .. 'usd:' .. per, usd_est
        end
        local pid, reset = period_of(per, now)
        local cur = redis.call('HMGET', KEYS[3], counter .. ':id', counter .. ':used',
          counter .. ':reserved')
        local used, reserved = 0, 0
        if cur[1] == pid then
          used = tonumber(cur[2]) or 0
          reserved = tonumber(cur[3]) or 0
        end
        if cost > limit then
          return answer('REJECT', 0, 'too_large:budget:' .. label, cost .. '/' .. limit)
        end
        if used + cost > limit then
          if pol['on_exhausted'] == 'wait' and reset > 0 then
            if reset > exhausted_until then
              exhausted_until, exhausted_reason = reset, 'exhausted:' .. label
            end
          else
            return answer('REJECT', reset, 'exhausted:' .. label, used .. '/' .. limit)
          end
        elseif used + reserved + cost > limit then
          settle_wait = true
          wait_reason = wait_reason or ('inflight:' .. label)
        end
        local entry = {pid, used, reserved, cost}
        if unit == 'usd:' then dollars[counter] = entry else budgets[counter] = entry end
      end
    end
  end
end

-- 2. concurrency: the reservations in flight
local max_conc = tonumber(pol['max_concurrency'])
if max_conc and redis.call('HLEN', KEYS[4]) >= max_conc then
  settle_wait = true
  wait_reason = wait_reason or 'concurrency'
end

-- 3. per-minute buckets (GCRA: capacity one minute of tokens, continuous refill)
local costs = {rpm = 1, itpm = input, otpm = output}
local new_tats, intervals = {}, {}
local rate_until, rate_reason = 0, nil
for _, scope in ipairs(scopes) do
  for _, kind in ipairs({'rpm', 'itpm', 'otpm'}) do
    local limit = tonumber(pol[scope[1] .. 'rate:' .. kind])
    if limit then
      local cost = costs[kind]
      if cost > limit then
        return answer('REJECT', 0, 'too_large:rate:' .. scope[2] .. kind, cost .. '/' .. limit)
      end
      local bucket = scope[1] .. kind
      local interval = 60000 / limit
      local tat = tonumber(redis.call('HGET', KEYS[2], bucket)) or now
      if tat < now then tat = now end
      local new_tat = tat + cost * interval
      if new_tat - now > 60000 then
        local fits_at = math.ceil(new_tat - 60000)
        if fits_at > rate_until then rate_until, rate_reason = fits_at, 'rate:' .. scope[2] .. kind end
      end
      new_tats[bucket] = new_tat
      intervals[bucket] = interval
    end
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
for bucket, tat in pairs(new_tats) do redis.call('HSET', KEYS[2], bucket, fmt(tat)) end
local periods, usd_periods = {}, nil
for counter, b in pairs(budgets) do
  redis.call('HSET', KEYS[3], counter .. ':id', b[1], counter .. ':used', b[2],
    counter .. ':reserved', b[3] + b[4])
  periods[counter] = b[1]
end
for counter, b in pairs(dollars) do
  redis.call('HSET', KEYS[3], counter .. ':id', b[1], counter .. ':used', fmt6(b[2]),
    counter .. ':reserved', fmt6(b[3] + b[4]))
  usd_periods = usd_periods or {}
  usd_periods[counter] = b[1]
end
local rec = {i = input, o = output, m = model, t = now, b = periods, r = intervals}
if prices then
  rec.p = ARGV[9]
  rec.u = usd_est
  rec.d = usd_periods
end
redis.call('HSET', KEYS[4], id, cjson.encode(rec))
redis.call('ZADD', KEYS[5], now + hold, id)
if ARGV[8] == '1' and KEYS[8] then redis.call('HSET', KEYS[8], id, '1') end
return answer('ADMIT', 0, '', '')
