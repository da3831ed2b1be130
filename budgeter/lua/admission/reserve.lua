--[[ admission/reserve.lua — check and reserve every limit of one scope in one atomic call, for one
request or for many (each decided in turn, as if called once per request in that order).
-- needs: lib/periods.lua
-- needs: lib/hash_cache.lua
-- needs: lib/prices.lua
A scope is a tenant ({t:<tenant>}) or one model of the upstream account ({g:<digest>}).
All keys carry the scope's hash tag, so the call is correct on Redis Cluster.

KEYS[1] policy         hash  flattened policy (budget:<period>, usd:<period>, rate:<kind>,
                             m:<model>:<same>, allowlist, allow:<model>, max_concurrency,
                             on_exhausted, notify); not read when ARGV[2] gives the policy
KEYS[2] buckets        hash  [m:<model>:]rpm|itpm|otpm -> GCRA theoretical arrival time (ms)
KEYS[3] budget         hash  <counter>:id, <counter>:used, <counter>:reserved where counter
                             is [m:<model>:][usd:]<period> (usd counters in US dollars)
KEYS[4] resv           hash  reservation id -> reservation JSON
KEYS[5] resv_deadline  zset  reservation id -> deadline (ms) for the reaper
KEYS[6] state          hash  waiting_settle flag; paused_until (ms): DEFER everything until then
KEYS[7] recent         list  (optional) the last 20 decisions: '<now ms> <decision> <reason> <tokens>'
KEYS[8] resv_sent      hash  (optional) reservation id -> 1, written at once when asked
KEYS[9..16]            (optional) an API key's scope ({t:<tenant>}:k:<key>:, the tenant's slot):
                       its policy (an empty hash: no limits), buckets, budget, resv, resv_deadline,
                       state, recent, resv_sent. A request is admitted only if both scopes admit
                       it, and then both are written; a refusal changes neither (but a DEFER
                       waiting on in-flight work sets waiting_settle in the scope that waits).
                       The answer: a REJECT of the tenant, else of the key, else the latest DEFER
                       (the tenant's when both defer to the same ms); the key's reasons are
                       prefixed 'key:'. The key's recent list gets the same entries as KEYS[7].
                       A key that already holds the id (an earlier call) is neither checked
                       nor written again, as a scope of its own would answer already_reserved
ARGV[1] now in ms, or '' to use Redis server TIME
ARGV[2] the flat policy as a JSON object, or '' to read KEYS[1] ('' policy hash: unknown), or
        '-' to read KEYS[1] where an empty hash means no limits (a key's scope)
ARGV[3] the requests, a JSON array of arrays, one per request:
  [1] reservation id (idempotent: a second call with the same id answers ADMIT)
  [2] input tokens (count_tokens)
  [3] max_tokens
  [4] hold ms: the reservation's deadline is now + hold
  [5] model (its m:<model>: limits apply too; recorded for usage accounting)
  [6] '1': mark the reservation sent at once (the reaper then charges it in full)
  [7] the model's price argument (lib/prices.lua: base prices 'input output cache_write
      cache_read' in USD per million tokens, then its long-context tiers), or '' (then a
      usd budget refuses the request: 'unpriced_model'). The dollars reserved are the
      dearest the request can cost in the tier its input tokens fall in (prices_reserve)
  [8] (optional) a JSON object text stored as "x" in the reservation (who and what the
      request is for: budgeter/ledger), or ''
  [9] (optional) '1': check only: answer as if reserving, change nothing and record no
      decision (the other scopes of a chain, after one refused: the latest DEFER wins)

Returns decision, until_ms, reason, now_ms, detail for each request in order, one flat
list of 5 per request:
  'ADMIT'  next     ''  (next = the first ms the tenant's request rate, its policy-wide
                    rate:rpm, takes another request when that is later than now, else 0: a
                    worker parks the tenant until then instead of leasing a job the bucket
                    would defer; the key's and the models' buckets are not looked at)
  'ADMIT'  0        'already_reserved'
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
local now = server_now(ARGV[1])
local requests = cjson.decode(ARGV[3])
local count = #requests
local replies = {}

-- one scope: its key offset in KEYS, its policy and what is read once per call
local function scope_of(o, mode)
  local pol = {}
  if mode ~= '' and mode ~= '-' then
    pol = cjson.decode(mode)
  else
    local flat = redis.call('HGETALL', KEYS[o + 1])
    if #flat == 0 and mode == '' then return nil end
    for i = 1, #flat, 2 do pol[flat[i]] = flat[i + 1] end
  end
  return {
    o = o, pol = pol, plans = {}, deadlines = {},
    paused = tonumber(redis.call('HGET', KEYS[o + 6], 'paused_until')),
    max_conc = tonumber(pol['max_concurrency']),
    wait_on_exhausted = pol['on_exhausted'] == 'wait',
    in_flight = nil,  -- HLEN of its resv, read once when max_concurrency needs it
  }
end

local tenant = scope_of(0, ARGV[2])
if not tenant then  -- a reservation made before the policy went is still idempotent
  for n, q in ipairs(requests) do
    local r = (n - 1) * 5
    replies[r + 1], replies[r + 2], replies[r + 3] = 'REJECT', 0, 'unknown_tenant'
    if redis.call('HEXISTS', KEYS[4], tostring(q[1])) == 1 then
      replies[r + 1], replies[r + 3] = 'ADMIT', 'already_reserved'
    end
    replies[r + 4], replies[r + 5] = now, ''
  end
  return replies
end
local key = nil
if #KEYS >= 16 then key = scope_of(8, '-') end

local recent = {}
local first_recent = count - 19  -- only the last 20 decisions are kept
local checking = false  -- the request being decided is only checked (its item [9])

-- what applies to a model in a scope, worked out once per call: its budgets and buckets
-- (the policy's own, then the model's 'm:<model>:' fields), and the reservation's JSON tail
local function plan_of(s, model)
  local plan = s.plans[model]
  if plan then return plan end
  local pol = s.pol
  plan = {budgets = {}, rates = {}, any_usd = false}
  local scopes = {{'', ''}}
  if model ~= '' then scopes[2] = {'m:' .. model .. ':', 'model:'} end
  local periods, usd_periods, intervals, limits = {}, {}, {}, {}
  for _, scope in ipairs(scopes) do
    for _, unit in ipairs({'budget:', 'usd:'}) do
      for _, per in ipairs({'minute', 'hour', 'day', 'month', 'total'}) do
        local limit = tonumber(pol[scope[1] .. unit .. per])
        if limit then
          local usd = unit == 'usd:'
          local counter, label = scope[1] .. per, scope[2] .. per
          if usd then
            counter, label = scope[1] .. 'usd:' .. per, scope[2] .. 'usd:' .. per
            plan.any_usd = true
          end
          local pid, reset = period_of(per, now)
          if usd then usd_periods[counter] = pid else periods[counter] = pid end
          limits[counter] = limit
          plan.budgets[#plan.budgets + 1] = {
            usd = usd, limit = limit, pid = pid, reset = reset, label = label,
            id = counter .. ':id', used = counter .. ':used', reserved = counter .. ':reserved',
          }
        end
      end
    end
  end
  for _, scope in ipairs(scopes) do
    for _, kind in ipairs({'rpm', 'itpm', 'otpm'}) do
      local limit = tonumber(pol[scope[1] .. 'rate:' .. kind])
      if limit then
        local bucket = scope[1] .. kind
        intervals[bucket] = 60000 / limit
        plan.rates[#plan.rates + 1] = {
          kind = kind, limit = limit, bucket = bucket, interval = 60000 / limit,
          label = 'rate:' .. scope[2] .. kind, too_large = 'too_large:rate:' .. scope[2] .. kind,
        }
      end
    end
  end
  plan.allowed = not pol['allowlist'] or pol['allow:' .. model]
  -- the reservation record: {"i":..,"o":..,"t":..,"m":..,"b":..,"r":..[,"n","th"][,"p","u","d"]}
  -- with notify thresholds, "n" (counter -> limit) and "th" let settle.lua tell crossings
  local tail = ',"m":' .. cjson.encode(model) .. ',"b":' .. cjson.encode(periods)
    .. ',"r":' .. cjson.encode(intervals)
  if pol['notify'] and next(limits) then
    tail = tail .. ',"n":' .. cjson.encode(limits) .. ',"th":' .. cjson.encode(pol['notify'])
  end
  plan.tail = tail
  if plan.any_usd then plan.usd_tail = tail .. ',"d":' .. cjson.encode(usd_periods) end
  s.plans[model] = plan
  return plan
end

local function answer(n, decision, until_ms, reason, detail, tokens)
  local r = (n - 1) * 5
  replies[r + 1], replies[r + 2], replies[r + 3] = decision, until_ms, reason
  replies[r + 4], replies[r + 5] = now, detail
  if KEYS[7] and n >= first_recent and not checking then
    recent[#recent + 1] = string.format('%d %s %s %d', now, decision,
      reason ~= '' and reason or '-', tokens)
  end
end

-- check every limit of scope s for one request: nil when it fits (the values to write are
-- left in its plan), else decision, until_ms, reason, detail
local function check(s, plan, input, output, est, model, prices, usd_est)
  if not plan.allowed then return 'REJECT', 0, 'model_not_allowed', model end
  if s.paused and s.paused > now then return 'DEFER', s.paused, 'paused', '' end
  local budget = KEYS[s.o + 3]
  local settle_wait, wait_reason = false, nil
  local exhausted_until, exhausted_reason = 0, nil

  -- 1. calendar budgets, in tokens and in dollars
  for _, b in ipairs(plan.budgets) do
    local cost = est
    if b.usd then
      if not prices then return 'REJECT', 0, 'unpriced_model', model end
      cost = usd_est
    end
    local used, reserved = 0, 0
    if hget(budget, b.id) == b.pid then
      used = tonumber(hget(budget, b.used)) or 0
      reserved = tonumber(hget(budget, b.reserved)) or 0
    end
    b.cur_used, b.cur_reserved = used, reserved
    if cost > b.limit then
      return 'REJECT', 0, 'too_large:budget:' .. b.label, cost .. '/' .. b.limit
    end
    if used + cost > b.limit then
      if s.wait_on_exhausted and b.reset > 0 then
        if b.reset > exhausted_until then
          exhausted_until, exhausted_reason = b.reset, 'exhausted:' .. b.label
        end
      else
        return 'REJECT', b.reset, 'exhausted:' .. b.label, used .. '/' .. b.limit
      end
    elseif used + reserved + cost > b.limit then
      settle_wait = true
      wait_reason = wait_reason or ('inflight:' .. b.label)
    end
  end

  -- 2. concurrency: the reservations in flight
  if s.max_conc then
    s.in_flight = s.in_flight or redis.call('HLEN', KEYS[s.o + 4])
    if s.in_flight >= s.max_conc then
      settle_wait = true
      wait_reason = wait_reason or 'concurrency'
    end
  end

  -- 3. per-minute buckets (GCRA: capacity one minute of tokens, continuous refill)
  local rate_until, rate_reason = 0, nil
  for _, b in ipairs(plan.rates) do
    local cost = 1
    if b.kind == 'itpm' then cost = input elseif b.kind == 'otpm' then cost = output end
    if cost > b.limit then
      return 'REJECT', 0, b.too_large, cost .. '/' .. b.limit
    end
    local tat = tonumber(hget(KEYS[s.o + 2], b.bucket)) or now
    if tat < now then tat = now end
    local new_tat = tat + cost * b.interval
    b.new_tat = new_tat
    if new_tat - now > 60000 then
      local fits_at = math.ceil(new_tat - 60000)
      if fits_at > rate_until then rate_until, rate_reason = fits_at, b.label end
    end
  end

  if exhausted_reason then return 'DEFER', exhausted_until, exhausted_reason, '' end
  if rate_until > 0 or settle_wait then
    if settle_wait then hset(KEYS[s.o + 6], 'waiting_settle', '1') end
    return 'DEFER', rate_until, rate_reason or wait_reason, ''
  end
  return nil
end

-- ADMIT in scope s: apply every limit (the values check worked out for this request)
local function commit(s, plan, id, input, output, hold, sent, price_arg, prices, usd_est, meta)
  local est, budget, resv = input + output, KEYS[s.o + 3], KEYS[s.o + 4]
  for _, b in ipairs(plan.rates) do hset(KEYS[s.o + 2], b.bucket, fmt(b.new_tat)) end
  for _, b in ipairs(plan.budgets) do
    if hget(budget, b.id) ~= b.pid then  -- a new period: it starts from nothing used
      hset(budget, b.id, b.pid)
      hset(budget, b.used, b.usd and fmt6(0) or 0)
    end
    if b.usd then
      hset(budget, b.reserved, fmt6(b.cur_reserved + usd_est))
    else
      hset(budget, b.reserved, b.cur_reserved + est)
    end
  end
  local head = string.format('{"i":%d,"o":%d,"t":%d', input, output, now)
  local x = meta ~= '' and (',"x":' .. meta) or ''
  if prices then
    hset(resv, id, head .. ',"p":' .. cjson.encode(price_arg) .. ',"u":'
      .. string.format('%.14g', usd_est) .. (plan.usd_tail or plan.tail) .. x .. '}')
  else
    hset(resv, id, head .. plan.tail .. x .. '}')
  end
  s.deadlines[#s.deadlines + 1] = now + hold
  s.deadlines[#s.deadlines + 1] = id
  if sent == '1' and KEYS[s.o + 8] then hset(KEYS[s.o + 8], id, '1') end
  if s.in_flight then s.in_flight = s.in_flight + 1 end
end

-- an ADMIT's until: when the scope's policy-wide request bucket (rpm) of this request's
-- plan takes the next request, if later than now (0: it has room now, or no such bucket)
local function next_request_at(plan)
  for _, b in ipairs(plan.rates) do
    if b.bucket == 'rpm' then
      local at = math.ceil(b.new_tat + b.interval - 60000)
      if at > now then return at end
    end
  end
  return 0
end

local function reserve_one(n, id, input, output, hold, model, sent, price_arg, meta)
  local est = input + output
  if hget(KEYS[4], id) then
    return answer(n, 'ADMIT', 0, 'already_reserved', '', est)
  end
  local prices = prices_parse(price_arg)
  local usd_est = 0
  if prices then usd_est = prices_reserve(prices, input, output) end
  local plan = plan_of(tenant, model)
  local d, u, r, det = check(tenant, plan, input, output, est, model, prices, usd_est)
  local key_plan = nil
  if key and d ~= 'REJECT' and not hget(KEYS[key.o + 4], id) then  -- held: not again
    key_plan = plan_of(key, model)
    local kd, ku, kr, kdet = check(key, key_plan, input, output, est, model, prices, usd_est)
    if kd == 'REJECT' or (kd and (not d or ku > u)) then
      d, u, r, det = kd, ku, 'key:' .. kr, kdet
    end
  end
  if d then return answer(n, d, u, r, det, est) end
  if not checking then
    commit(tenant, plan, id, input, output, hold, sent, price_arg, prices, usd_est, meta)
    if key_plan then
      commit(key, key_plan, id, input, output, hold, sent, price_arg, prices, usd_est, '')
    end
  end
  return answer(n, 'ADMIT', next_request_at(plan), '', '', est)
end

local ids = {}
for n, q in ipairs(requests) do ids[n] = tostring(q[1]) end
hprefetch(KEYS[4], ids)
for n, q in ipairs(requests) do
  checking = q[9] == '1'
  reserve_one(n, tostring(q[1]), tonumber(q[2]), tonumber(q[3]), tonumber(q[4]), tostring(q[5]),
    tostring(q[6]), tostring(q[7]), q[8] or '')
end

flush()
for _, s in ipairs({tenant, key}) do
  local deadlines = s.deadlines
  for i = 1, #deadlines, 1000 do
    redis.call('ZADD', KEYS[s.o + 5], unpack(deadlines, i, math.min(i + 999, #deadlines)))
  end
end
if #recent > 0 then
  for _, list in ipairs({KEYS[7], KEYS[15]}) do
    redis.call('LPUSH', list, unpack(recent))
    redis.call('LTRIM', list, 0, 19)
  end
end
return replies
