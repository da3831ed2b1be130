--[[ requeue.lua — give a leased job back to its tenant's queue.
Only the holder of the lease can: if the lease is gone (reclaimed), nothing happens.

KEYS[1] queue     list
KEYS[2] leases    zset
KEYS[3] jstate    hash
KEYS[4] attempts  hash
ARGV[1] job id
ARGV[2] 'head' (a deferred job keeps its place) or 'tail' (a failed attempt goes last)
ARGV[3] '1' to not count this as an attempt (DEFER), '0' otherwise

Returns 1 when requeued, 0 when the lease was not held.
]]
local id = ARGV[1]
if redis.call('ZREM', KEYS[2], id) == 0 then return 0 end
redis.call('HSET', KEYS[3], id, 'queued')
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[4], id, -1) end
if ARGV[2] == 'head' then redis.call('LPUSH', KEYS[1], id) else redis.call('RPUSH', KEYS[1], id) end
return 1
