--[[ sched/pick.lua — choose the tenants to serve next (weighted fair queueing), one per
job slot the caller has free.
-- needs: lib/periods.lua
-- needs: lib/hfq.lua
Parked tenants whose time has come go back to ready first; then the ready tenant with the
lowest virtual time is chosen and its time advances by cost / weight, where cost is the
mean size of its jobs in thousands of tokens (1 until workers have reported any), so
that tenants share tokens, not job counts.

KEYS[1] ready   zset  tenant -> virtual time
KEYS[2] parked  zset  tenant -> ms its DEFER ends
KEYS[3] vtime   hash  tenant -> last virtual time; '_v': the virtual clock (see
                      sched/activate.lua), set to the chosen tenant's time before it advances
KEYS[4] weight  hash  tenant -> weight
KEYS[5] cost    hash  tenant -> mean job size in thousands of tokens (moving average)
KEYS[6] probe   hash  tenant -> probes in a row not deferred: the tenant came due off a park
                      and gets one lease (a probe) at a time until its next decision
KEYS[7] held    zset  probing tenant with its probe lease out -> ms the hold ends (the
                      worker ends it at the probe's decision: sched/probe_end.lua)
KEYS[8] parent  hash  tenant -> parent (the tree); when empty, flat fair queueing as above,
                      else hierarchical (lib/hfq.lua): weights are shares among siblings
KEYS[9] hfq     base of lib/hfq.lua's per-node zsets
ARGV[1] now in ms, or ''
ARGV[2] max parked (and held) tenants to promote per call
ARGV[3] how many picks (job slots); each pick advances the chosen tenant's time, so a
        tenant can be chosen several times, in fair proportion
ARGV[4] probe hold ms: how long a probe lease keeps its tenant out of ready at most
ARGV[5..] triples tenant, tokens, jobs: work the caller served since its last pick, folded
        into each tenant's cost (weight 0.2 per report)

A due parked tenant enters ready probing; a probing tenant chosen gets that one pick and
moves from ready to held, so a tenant released by its bucket is leased one job per
admission decision, not one per free slot (issue 20). A hold that ends unended (its worker
died) puts the tenant back in ready, no longer probing.

Returns {next parked ms, now, tenant, tenant, ...}: one tenant per pick, none when no
tenant is ready, a probe pick as '?<tenant>'; next parked ms is the earliest park end (-1
when nobody is parked), so an idle worker knows how long to sleep.
]]
local now = server_now(ARGV[1])
for i = 5, #ARGV - 2, 3 do
  local jobs = tonumber(ARGV[i + 2])
  if jobs and jobs > 0 then
    local size = math.max(tonumber(ARGV[i + 1]) / jobs / 1000, 0.001)
    local old = tonumber(redis.call('HGET', KEYS[5], ARGV[i]))
    redis.call('HSET', KEYS[5], ARGV[i], old and (old * 0.8 + size * 0.2) or size)
  end
end
local function enter(tenant)
  if not redis.call('ZSCORE', KEYS[1], tenant) then
    local v = tonumber(redis.call('HGET', KEYS[3], tenant)) or 0
    local clock = tonumber(redis.call('HGET', KEYS[3], '_v')) or 0
    if clock > v then v = clock end
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if first[2] and tonumber(first[2]) > v then v = tonumber(first[2]) end
    redis.call('ZADD', KEYS[1], v, tenant)
  end
  hfq_enter(KEYS[9], KEYS[8], tenant)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, tenant in ipairs(due) do
  redis.call('ZREM', KEYS[2], tenant)
  redis.call('HSETNX', KEYS[6], tenant, 0)
  enter(tenant)
end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, tenant in ipairs(lapsed) do
  redis.call('ZREM', KEYS[7], tenant)
  redis.call('HDEL', KEYS[6], tenant)
  enter(tenant)
end
local next_parked = -1
local np = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if np[2] then next_parked = tonumber(np[2]) end
local reply = {next_parked, now}
local steps = {}  -- tenant -> cost / weight
local tree = redis.call('HLEN', KEYS[8]) > 0
for _ = 1, tonumber(ARGV[3]) or 1 do
  local top = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if not top[1] then break end
  if tree then
    local chosen, path = hfq_pick(KEYS[9], KEYS[8], KEYS[1])
    if chosen then  -- else a ready tenant not in the tree's zsets: served flat
      hfq_advance(KEYS[9], path, tonumber(redis.call('HGET', KEYS[5], chosen)) or 1, KEYS[4])
      top = {chosen, redis.call('ZSCORE', KEYS[1], chosen)}
    end
  end
  local tenant = top[1]
  local step = steps[tenant]
  if not step then
    local w = tonumber(redis.call('HGET', KEYS[4], tenant)) or 1
    step = (tonumber(redis.call('HGET', KEYS[5], tenant)) or 1) / w
    steps[tenant] = step
  end
  local v = tonumber(top[2]) + step
  redis.call('ZADD', KEYS[1], v, tenant)
  redis.call('HSET', KEYS[3], tenant, v, '_v', top[2])
  if redis.call('HEXISTS', KEYS[6], tenant) == 1 then
    redis.call('ZREM', KEYS[1], tenant)
    redis.call('ZADD', KEYS[7], now + tonumber(ARGV[4]), tenant)
    tenant = '?' .. tenant
  end
  reply[#reply + 1] = tenant
end
return reply
