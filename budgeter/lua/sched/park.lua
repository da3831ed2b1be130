--[[ sched/park.lua — a tenant's head job was deferred: park the tenant until it can fit.
No worker looks at a parked tenant until sched/pick.lua promotes it at `until`.

KEYS[1] ready   zset
KEYS[2] parked  zset
ARGV[1] tenant
ARGV[2] until (ms, Redis server time)

Returns 1.
]]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
