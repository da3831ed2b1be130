--[[ queue/requeue.lua — give a leased job back to its tenant's queue of its priority.
Only the holder of the lease can: if the lease is gone (reclaimed), nothing happens.

KEYS[1] queue     list  priority normal
KEYS[2] leases    zset
KEYS[3] jstate    hash
KEYS[4] attempts  hash
KEYS[5] canceled_batches  set
KEYS[6] bmeta     hash  batch id -> '<enqueued ms> <deadline ms> [priority]'
KEYS[7] queue_high list priority high
KEYS[8] queue_low  list priority low
ARGV[1] job id (job ids are '<batch id>:<custom_id>')
ARGV[2] 'head' (a deferred job keeps its place) or 'tail' (a failed attempt goes last)
ARGV[3] '1' to not count this as an attempt (DEFER), '0' otherwise
ARGV[4] the attempt number the caller leased: a stale worker whose lease was reclaimed
        (and the job leased again) cannot requeue it

Returns 1 when requeued, 0 when the lease was not held, 2 when the job's batch is being
canceled: the job stays leased and the caller acks it as canceled.
]]
local id = ARGV[1]
if not redis.call('ZSCORE', KEYS[2], id) then return 0 end
if tonumber(redis.call('HGET', KEYS[4], id)) ~= tonumber(ARGV[4]) then return 0 end
if redis.call('SISMEMBER', KEYS[5], string.match(id, '^([^:]*):') or '') == 1 then return 2 end
redis.call('ZREM', KEYS[2], id)
redis.call('HSET', KEYS[3], id, 'queued')
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[4], id, -1) end
local meta = redis.call('HGET', KEYS[6], string.match(id, '^([^:]*):') or '') or ''
local prio = string.match(meta, '^%S+ %S+ (%a+)')
local queue = KEYS[1]
if prio == 'high' then queue = KEYS[7] elseif prio == 'low' then queue = KEYS[8] end
if ARGV[2] == 'head' then redis.call('LPUSH', queue, id) else redis.call('RPUSH', queue, id) end
return 1
