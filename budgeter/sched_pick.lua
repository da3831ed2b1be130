--[[ sched_pick.lua — choose the tenant to serve next (weighted fair queueing).
-- needs: lua_periods.lua
Parked tenants whose time has come go back to ready first; then the ready tenant with the
lowest virtual time is chosen and its time advances by 1 / weight.

KEYS[1] ready   zset  tenant -> virtual time
KEYS[2] parked  zset  tenant -> ms its DEFER ends
KEYS[3] vtime   hash  tenant -> last virtual time; '_v': the virtual clock (see
                      sched_activate.lua), set to the chosen tenant's time before it advances
KEYS[4] weight  hash  tenant -> weight
ARGV[1] now in ms, or ''
ARGV[2] max parked tenants to promote per call

Returns {tenant, next parked ms, now}: tenant '' when none is ready; next parked ms is
the earliest park end (-1 when nobody is parked), so an idle worker knows how long to
sleep.
]]
local now = server_now(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, tenant in ipairs(due) do
  redis.call('ZREM', KEYS[2], tenant)
  if not redis.call('ZSCORE', KEYS[1], tenant) then
    local v = tonumber(redis.call('HGET', KEYS[3], tenant)) or 0
    local clock = tonumber(redis.call('HGET', KEYS[3], '_v')) or 0
    if clock > v then v = clock end
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if first[2] and tonumber(first[2]) > v then v = tonumber(first[2]) end
    redis.call('ZADD', KEYS[1], v, tenant)
  end
end
local next_parked = -1
local np = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if np[2] then next_parked = tonumber(np[2]) end
local top = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not top[1] then return {'', next_parked, now} end
local tenant = top[1]
local w = tonumber(redis.call('HGET', KEYS[4], tenant)) or 1
local v = tonumber(top[2]) + 1 / w
redis.call('ZADD', KEYS[1], v, tenant)
redis.call('HSET', KEYS[3], tenant, v, '_v', top[2])
return {tenant, next_parked, now}
