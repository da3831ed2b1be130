--[[ admission/settle.lua — replace reservations by what was really spent, exactly once: one or many
per call (each settled in turn, as if called once per reservation in that order).
-- needs: lib/periods.lua
-- needs: lib/hash_cache.lua
-- needs: lib/prices.lua
A reservation that is no longer in KEYS[3] was settled (or reaped) before: nothing happens.

KEYS[1] buckets        hash  [m:<model>:]rpm|itpm|otpm -> GCRA theoretical arrival time (ms)
KEYS[2] budget         hash  <counter>:id, <counter>:used, <counter>:reserved (see admission/reserve.lua;
                             usd counters are refunded and charged in US dollars)
KEYS[3] resv           hash  reservation id -> reservation JSON (written by admission/reserve.lua)
KEYS[4] resv_deadline  zset  reservation id -> deadline (ms)
KEYS[5] resv_sent      hash  reservation id -> 1 once the upstream may have been called
KEYS[6] usage          hash  <period>:<period id>:<model>:<kind> -> tokens (kind usd: dollars)
KEYS[7] state          hash  waiting_settle flag
KEYS[8] outbox         stream (optional) notification events: a reservation made with notify
                             thresholds (its "n" limits and "th") appends 'budget.threshold'
                             the first time, in a period, a budget's used share reaches each
                             threshold, and 'budget.exhausted' when it reaches 1; fields
                             'type' and 'data' (JSON), budgeter/notify/events.py. The budget
                             hash keeps '<counter>:notified' = '<period id> <highest threshold>'
KEYS[9] ledger        stream (optional, the tenant's own scope only) one entry per settled
                             reservation, appended in this call (budgeter/ledger/entry.py):
                             id = Redis time of the settle, fields key ancestors model input
                             output cache_creation cache_read usd reserved outcome source tags
                             (always all, in that order; outcome settled|charged_full|released);
                             trimmed with MINID to the retention (ms, required with KEYS[9]:
                             ARGV[2] of 3 when settling, ARGV[4] when reaping). With it, a
                             reservation whose "x" names a key ("k") also adds its usage to
                             KEYS[6] fields 'k:<key id>:<period>:<period id>:<model>:<kind>'
KEYS[10] minutes       hash (optional, the tenant's own scope only) per-minute rollups for 48 h:
                             '<minute>:<kind>' -> tokens (kind usd: dollars), minute = settle
                             time ms // 60000, kinds input|output|cache_creation|cache_read|usd,
                             and 'trimmed' = the oldest minute kept (older ones are deleted
                             by the first settle of each minute, which also sets the hash to
                             expire 48 h later);
                             budgeter/tenants/rollups.py
ARGV[1] now in ms, or '' to use Redis server TIME
ARGV[2] 'reap', ARGV[3] max reservations: every reservation past its deadline is charged
        in full if marked sent, else released (ARGV[4]: the ledger's retention in ms). Returns one
        {settled, waiting_settle, charged_full, released, actual_tokens, reserved_tokens,
        events}
ARGV[2] otherwise (ARGV[3] when ARGV[2] is the ledger's retention in ms) the reservations,
        a JSON array of arrays, one per reservation:
  [1] mode: 'usage'   charge what the upstream reported ([3]..[6]); in dollars at the
                      reservation's prices (lib/prices.lua), in the tier of the real
                      input + cache_creation + cache_read
            'full'    charge the whole reservation (upstream may have served it; in
                      dollars: what was reserved)
            'release' charge nothing (the upstream was never called)
  [2] reservation id
  [3] input, [4] output, [5] cache_creation_input, [6] cache_read_input tokens ('usage'
      only; anything for the other modes)
  Returns settled, waiting_settle, charged_full, released, actual_tokens, reserved_tokens,
  events for each reservation in order, one flat list of 7 per reservation (events: the
  notification events appended for it; the reap's single answer has 7 values too).

  settled: reservations settled (0: already settled)
  waiting_settle: 1 when a DEFER was waiting for in-flight work to settle (flag cleared;
                  reported once, by the first reservation that settles)
]]
local now = server_now(ARGV[1])
local gone = {}
-- usage increments, summed per hash field and written once: prefix -> what -> amount
local incr = {}
local USAGE_PERIODS = {'day', 'month', 'total'}

local prefixes = {}  -- period -> day number -> model -> '<period>:<period id>:<model>:'
local function usage_prefix(per, t, model)
  local day = math.floor(t / 86400000)
  local by_day = prefixes[per]
  if not by_day then by_day = {}; prefixes[per] = by_day end
  local by_model = by_day[day]
  if not by_model then by_model = {}; by_day[day] = by_model end
  local prefix = by_model[model]
  if not prefix then
    prefix = per .. ':' .. period_of(per, t) .. ':' .. model .. ':'
    by_model[model] = prefix
  end
  return prefix
end

local function add(prefix, what, n)
  local fields = incr[prefix]
  if not fields then fields = {}; incr[prefix] = fields end
  fields[what] = (fields[what] or 0) + n
end

-- per-minute rollups (KEYS[10]): what this call charged, all in the minute of now
local ROLLUP_KINDS = {'input', 'output', 'cache_creation', 'cache_read', 'usd'}
local ROLLUP_MINUTES = 2880  -- 48 h
local rolled, rolled_n = {0, 0, 0, 0, 0}, 0

local function rollup(a_in, a_out, a_cc, a_cr, usd)
  rolled_n = rolled_n + 1
  rolled[1], rolled[2] = rolled[1] + a_in, rolled[2] + a_out
  rolled[3], rolled[4], rolled[5] = rolled[3] + a_cc, rolled[4] + a_cr, rolled[5] + usd
end

local function rollup_write()
  local key = KEYS[10]
  local minute = math.floor(now / 60000)
  for i, what in ipairs(ROLLUP_KINDS) do
    if rolled[i] > 0 and i == 5 then
      redis.call('HINCRBYFLOAT', key, minute .. ':usd', fmt6(rolled[i]))
    elseif rolled[i] > 0 then
      redis.call('HINCRBY', key, minute .. ':' .. what, rolled[i])
    end
  end
  -- trimming and the expiry: once a minute (the first settle of a minute moves them)
  local oldest = minute - ROLLUP_MINUTES + 1
  local trimmed = tonumber(redis.call('HGET', key, 'trimmed')) or oldest - 1
  if trimmed >= oldest then return end
  if oldest - trimmed > 60 then  -- a long pause: sweep (the hash holds the last 48 h only)
    for _, field in ipairs(redis.call('HKEYS', key)) do
      local m = tonumber(string.match(field, '^(%d+):'))
      if m and m < oldest then redis.call('HDEL', key, field) end
    end
  else
    local fields = {}
    for m = trimmed, oldest - 1 do
      for _, what in ipairs(ROLLUP_KINDS) do fields[#fields + 1] = m .. ':' .. what end
    end
    redis.call('HDEL', key, unpack(fields))
  end
  redis.call('HSET', key, 'trimmed', oldest)
  redis.call('PEXPIRE', key, ROLLUP_MINUTES * 60000)
end

-- the ledger (KEYS[9]): one entry per settled reservation, older than the retention trimmed
local OUTCOMES = {usage = 'settled', full = 'charged_full', release = 'released'}
local ledger_min = nil  -- the oldest stream id kept, worked out at the first entry

local function ledger_write(r, kind, a_in, a_out, a_cc, a_cr, usd, est)
  if not ledger_min then
    ledger_min = server_now('') - tonumber(ARGV[ARGV[2] == 'reap' and 4 or 2])
  end
  local x = r.x or {}
  local tags = ''
  if x.g and next(x.g) then tags = cjson.encode(x.g) end
  redis.call('XADD', KEYS[9], 'MINID', ledger_min, '*', 'key', x.k or '',
    'ancestors', table.concat(x.a or {}, ','), 'model', r.m, 'input', a_in, 'output', a_out,
    'cache_creation', a_cc, 'cache_read', a_cr, 'usd', fmt6(usd), 'reserved', est,
    'outcome', OUTCOMES[kind], 'source', x.s or '', 'tags', tags)
end

local kinds = {}
local events = 0  -- notification events appended by the reservation being settled

-- the used share of a budget after a charge: one event per threshold first reached in the
-- period (however many settles race: the mark is in the same hash as the counter)
local function notify(r, per, pid, used)
  local limit = r.n[per]
  if not limit or not KEYS[8] then return end
  local mark_field = per .. ':notified'
  local done = 0
  local mark = hget(KEYS[2], mark_field)
  if mark then
    local mark_pid, mark_t = string.match(mark, '^(%S+) (%S+)$')
    if mark_pid == pid then done = tonumber(mark_t) end
  end
  local highest = done
  for t in string.gmatch(r.th, '[^,]+') do
    local share = tonumber(t)
    if share > done and used >= share * limit then
      local data = {budget = per, period = pid, threshold = share, used = used, limit = limit}
      redis.call('XADD', KEYS[8], 'MAXLEN', '~', 10000, '*', 'type', 'budget.threshold',
        'data', cjson.encode(data))
      events = events + 1
      if share >= 1 then
        redis.call('XADD', KEYS[8], 'MAXLEN', '~', 10000, '*', 'type', 'budget.exhausted',
          'data', cjson.encode(data))
        events = events + 1
      end
      highest = share
    end
  end
  if highest > done then hset(KEYS[2], mark_field, pid .. ' ' .. highest) end
end

local function settle_one(id, kind, a_in, a_out, a_cc, a_cr)
  local raw = hget(KEYS[3], id)
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
    if kind == 'full' then
      usd = r.u
    else  -- at the tier of the real input (input + cache creation + cache read)
      usd = prices_usage(prices_parse(r.p), a_in, a_out, a_cc, a_cr)
    end
  end

  for bucket, interval in pairs(r.r) do
    local what = kinds[bucket]
    if not what then
      what = string.match(bucket, '([^:]+)$')
      kinds[bucket] = what
    end
    local delta = 0
    if what == 'itpm' then delta = total_in - r.i
    elseif what == 'otpm' then delta = a_out - r.o
    elseif kind == 'release' then delta = -1 end
    if delta ~= 0 then
      local tat = tonumber(hget(KEYS[1], bucket))
      if tat then hset(KEYS[1], bucket, fmt(tat + delta * interval)) end
    end
  end

  for per, pid in pairs(r.b) do
    if hget(KEYS[2], per .. ':id') == pid then
      local reserved = (tonumber(hget(KEYS[2], per .. ':reserved')) or 0) - est
      if reserved < 0 then reserved = 0 end
      local used = (tonumber(hget(KEYS[2], per .. ':used')) or 0) + total
      hset(KEYS[2], per .. ':used', used)
      hset(KEYS[2], per .. ':reserved', reserved)
      if r.n then notify(r, per, pid, used) end
    end
  end

  for per, pid in pairs(r.d or {}) do
    if hget(KEYS[2], per .. ':id') == pid then
      local reserved = (tonumber(hget(KEYS[2], per .. ':reserved')) or 0) - r.u
      if reserved < 0.0000005 then reserved = 0 end
      local used = fmt6((tonumber(hget(KEYS[2], per .. ':used')) or 0) + usd)
      hset(KEYS[2], per .. ':used', used)
      hset(KEYS[2], per .. ':reserved', fmt6(reserved))
      if r.n then notify(r, per, pid, tonumber(used)) end
    end
  end

  if kind ~= 'release' then
    for _, per in ipairs(USAGE_PERIODS) do
      local prefix = usage_prefix(per, r.t, r.m)
      if a_in > 0 then add(prefix, 'input', a_in) end
      if a_out > 0 then add(prefix, 'output', a_out) end
      if a_cc > 0 then add(prefix, 'cache_creation', a_cc) end
      if a_cr > 0 then add(prefix, 'cache_read', a_cr) end
      add(prefix, 'requests', 1)
      if usd > 0 then add(prefix, 'usd', tonumber(fmt6(usd))) end
      if KEYS[9] and r.x and r.x.k then
        local key_prefix = 'k:' .. r.x.k .. ':' .. prefix
        if a_in > 0 then add(key_prefix, 'input', a_in) end
        if a_out > 0 then add(key_prefix, 'output', a_out) end
        if a_cc > 0 then add(key_prefix, 'cache_creation', a_cc) end
        if a_cr > 0 then add(key_prefix, 'cache_read', a_cr) end
        add(key_prefix, 'requests', 1)
        if usd > 0 then add(key_prefix, 'usd', tonumber(fmt6(usd))) end
      end
    end
    if KEYS[10] then rollup(a_in, a_out, a_cc, a_cr, usd) end
  end

  if KEYS[9] then ledger_write(r, kind, a_in, a_out, a_cc, a_cr, usd, est) end
  hdel(KEYS[3], id)
  gone[#gone + 1] = id
  hdel(KEYS[5], id)
  return true, total, est
end

local function finish()
  flush()
  for i = 1, #gone, 1000 do
    redis.call('ZREM', KEYS[4], unpack(gone, i, math.min(i + 999, #gone)))
  end
  for prefix, fields in pairs(incr) do
    for what, n in pairs(fields) do
      if what == 'usd' then
        redis.call('HINCRBYFLOAT', KEYS[6], prefix .. what, fmt6(n))
      else
        redis.call('HINCRBY', KEYS[6], prefix .. what, n)
      end
    end
  end
  if KEYS[10] and rolled_n > 0 then rollup_write() end
end

local function waiting_flag(settled)
  if settled > 0 and redis.call('HDEL', KEYS[7], 'waiting_settle') == 1 then return 1 end
  return 0
end

if ARGV[2] == 'reap' then
  local settled, full, released, actual, reserved = 0, 0, 0, 0, 0
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
  for _, id in ipairs(due) do
    local kind = 'release'
    if hget(KEYS[5], id) then kind = 'full' end
    local ok, a, e = settle_one(id, kind)
    if ok then
      settled = settled + 1
      actual = actual + a
      reserved = reserved + e
      if kind == 'full' then full = full + 1 else released = released + 1 end
    else
      gone[#gone + 1] = id
    end
  end
  finish()
  return {settled, waiting_flag(settled), full, released, actual, reserved, events}
end

local items = cjson.decode(ARGV[#ARGV])
for _, q in ipairs(items) do
  if q[1] ~= 'usage' and q[1] ~= 'full' and q[1] ~= 'release' then
    return redis.error_reply('admission/settle.lua: unknown mode ' .. tostring(q[1]))
  end
end
local ids = {}
for n, q in ipairs(items) do ids[n] = tostring(q[2]) end
hprefetch(KEYS[3], ids)
local replies, first_settled = {}, nil
for n, q in ipairs(items) do
  local kind = q[1]
  events = 0
  local ok, actual, est = settle_one(tostring(q[2]), kind, tonumber(q[3]) or 0,
    tonumber(q[4]) or 0, tonumber(q[5]) or 0, tonumber(q[6]) or 0)
  local r = (n - 1) * 7
  if ok then
    first_settled = first_settled or r
    replies[r + 1], replies[r + 2] = 1, 0
    replies[r + 3] = kind == 'full' and 1 or 0
    replies[r + 4] = kind == 'release' and 1 or 0
    replies[r + 5], replies[r + 6] = actual, est
    replies[r + 7] = events
  else
    for i = 1, 7 do replies[r + i] = 0 end
  end
end
finish()
if first_settled and waiting_flag(1) == 1 then replies[first_settled + 2] = 1 end
return replies
