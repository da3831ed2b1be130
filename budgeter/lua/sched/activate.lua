--[[ sched/activate.lua — a tenant has work: enter the ready set (unless parked).
-- needs: lib/hfq.lua
The scheduler's keys share the hash tag {sched}; no tenant key is touched here.

KEYS[1] ready   zset  tenant -> virtual time
KEYS[2] parked  zset  tenant -> ms its DEFER ends
KEYS[3] vtime   hash  tenant -> last virtual time; field '_v': the scheduler's virtual
                      clock (the virtual time of the last tenant served)
KEYS[4] held    zset  probing tenant with its probe lease out (see sched/pick.lua): like a
                      park, only an early end lets it back in
KEYS[5] parent  hash  tenant -> parent (see sched/pick.lua)
KEYS[6] hfq     base of lib/hfq.lua's per-node zsets: the tenant enters them too
ARGV[1] tenant
ARGV[2] '1' to end a park (or a probe hold) early (in-flight work settled), '0' otherwise

A tenant enters at max(its own virtual time, the virtual clock, the lowest ready one):
idle time earns no credit, and a tenant that was idle while nobody else had work does not
get to make up for it afterwards (a newcomer enters at the clock, not at 0). Returns 1 when it entered the ready set, 0 otherwise.
]]
local tenant = ARGV[1]
if redis.call('ZSCORE', KEYS[2], tenant) or redis.call('ZSCORE', KEYS[4], tenant) then
  if ARGV[2] ~= '1' then return 0 end
  redis.call('ZREM', KEYS[2], tenant)
  redis.call('ZREM', KEYS[4], tenant)
end
if redis.call('ZSCORE', KEYS[1], tenant) then return 0 end
local v = tonumber(redis.call('HGET', KEYS[3], tenant)) or 0
local clock = tonumber(redis.call('HGET', KEYS[3], '_v')) or 0
if clock > v then v = clock end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] and tonumber(first[2]) > v then v = tonumber(first[2]) end
redis.call('ZADD', KEYS[1], v, tenant)
hfq_enter(KEYS[6], KEYS[5], tenant)
return 1
