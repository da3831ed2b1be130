--[[ sched/probe_end.lua — a probing tenant's probe lease was decided and not deferred (or
given back unserved): end its hold and put it back in the ready set for its next probe.
-- needs: lib/hfq.lua
A tenant whose probes were not deferred ARGV[2] times in a row stops probing.

KEYS[1] ready   zset  tenant -> virtual time
KEYS[2] vtime   hash  tenant -> last virtual time; '_v': the virtual clock
KEYS[3] probe   hash  tenant -> probes in a row not deferred
KEYS[4] held    zset  probing tenant with its probe lease out -> ms the hold ends
KEYS[5] parent  hash  tenant -> parent (see sched/pick.lua)
KEYS[6] hfq     base of lib/hfq.lua's per-node zsets: the tenant enters them too
ARGV[1] tenant
ARGV[2] probes in a row not deferred after which the tenant is served at full speed again
ARGV[3] '1' when the probe was decided (counts), '0' when it was given back unserved

The tenant enters ready as in sched/activate.lua. Returns 1 when a hold ended, 0 when the
tenant was not held (its park or hold ended otherwise, or a deferral re-parked it).
]]
local tenant = ARGV[1]
if not redis.call('ZSCORE', KEYS[4], tenant) then return 0 end
redis.call('ZREM', KEYS[4], tenant)
if ARGV[3] == '1' and redis.call('HINCRBY', KEYS[3], tenant, 1) >= tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[3], tenant)
end
if redis.call('ZSCORE', KEYS[1], tenant) then return 1 end
local v = tonumber(redis.call('HGET', KEYS[2], tenant)) or 0
local clock = tonumber(redis.call('HGET', KEYS[2], '_v')) or 0
if clock > v then v = clock end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] and tonumber(first[2]) > v then v = tonumber(first[2]) end
redis.call('ZADD', KEYS[1], v, tenant)
hfq_enter(KEYS[6], KEYS[5], tenant)
return 1
