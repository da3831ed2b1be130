--[[ submit.lua — enqueue a whole batch into one tenant's queue in one atomic step.
-- needs: lua_periods.lua
Idempotent per (batch, custom_id): a job id already present is skipped, so a producer may
retry a submission safely. A batch is wholly queued or (unknown tenant) wholly refused.

KEYS[1] policy       hash  the tenant must have one
KEYS[2] jobs         hash  job id -> job JSON
KEYS[3] jstate       hash  job id -> state
KEYS[4] jmeta        hash  job id -> '<enqueued ms> <deadline ms>'
KEYS[5] queue        list  job ids, FIFO
KEYS[6] batch        hash  batch meta and request counts
KEYS[7] batch_jobs   list  the batch's job ids in order
KEYS[8] batches      zset  batch id -> created ms
ARGV[1] batch id
ARGV[2] now in ms, or '' for Redis server TIME
ARGV[3] time to live in ms (deadline = now + ttl; expires_ms of the batch)
ARGV[4..] job id, job JSON, job id, job JSON, ...

Returns {queued, total}: jobs newly queued by this call, and jobs in the batch; or the
error 'unknown_tenant'.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('unknown_tenant') end
local batch_id = ARGV[1]
local now = server_now(ARGV[2])
local ttl = tonumber(ARGV[3])

local created = tonumber(redis.call('HGET', KEYS[6], 'created_ms'))
if not created then
  created = now
  redis.call('HSET', KEYS[6], 'id', batch_id, 'created_ms', now, 'expires_ms', now + ttl,
    'processing', 0, 'succeeded', 0, 'errored', 0, 'canceled', 0, 'expired', 0)
  redis.call('ZADD', KEYS[8], now, batch_id)
end
local deadline = tonumber(redis.call('HGET', KEYS[6], 'expires_ms'))
local meta = string.format('%d %d', now, deadline)

local queued = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HSETNX', KEYS[2], id, ARGV[i + 1]) == 1 then
    redis.call('HSET', KEYS[3], id, 'queued')
    redis.call('HSET', KEYS[4], id, meta)
    redis.call('RPUSH', KEYS[5], id)
    redis.call('RPUSH', KEYS[7], id)
    queued = queued + 1
  end
end
if queued > 0 then
  redis.call('HINCRBY', KEYS[6], 'processing', queued)
  redis.call('HDEL', KEYS[6], 'ended_ms')
end
return {queued, redis.call('LLEN', KEYS[7])}
