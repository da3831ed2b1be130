--[[ sched/park.lua — a tenant's head job was deferred: park the tenant until it can fit.
No worker looks at a parked tenant until sched/pick.lua promotes it at `until`. A probing
tenant's hold ends here (its probe, or a job leased before it, was deferred) and its count
of probes in a row not deferred starts again at 0.

KEYS[1] ready   zset
KEYS[2] parked  zset
KEYS[3] probe   hash  tenant -> probes in a row not deferred (see sched/pick.lua)
KEYS[4] held    zset  probing tenant with its probe lease out
ARGV[1] tenant
ARGV[2] until (ms, Redis server time)

Returns 1.
]]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then redis.call('HSET', KEYS[3], ARGV[1], 0) end
return 1
