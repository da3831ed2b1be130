--[[ dequeue.lua — take the job at the head of one tenant's queues under a lease.
-- needs: lua_periods.lua
The queue of priority 'high' is served first, then 'normal', then 'low'. Entries whose
state is no longer 'queued' (canceled, duplicate, deleted) are dropped. A job in `jobs`
without a state is queued (submit writes none).

KEYS[1] queue     list  job ids of priority normal
KEYS[2] leases    zset  job id -> lease expiry (ms)
KEYS[3] jobs      hash  job id -> params JSON
KEYS[4] jstate    hash  job id -> state
KEYS[5] attempts  hash  job id -> attempts
KEYS[6] bmeta     hash  batch id -> '<enqueued ms> <deadline ms> [priority]'
KEYS[7] canceled_batches  set  batch ids being canceled
KEYS[8] policy    hash  the tenant's policy (absent: the tenant was deleted)
KEYS[9] queue_high list job ids of priority high
KEYS[10] queue_low list job ids of priority low
ARGV[1] now in ms, or '' for Redis server TIME
ARGV[2] lease in ms

Returns {job id, params JSON, attempt, jobs left in the queues, batch meta, now, canceled,
has_policy}; job id '' when empty. canceled is 1 when the job's batch is being canceled:
the caller acks it as canceled instead of serving it. Job ids are '<batch id>:<custom_id>'.
]]
local now = server_now(ARGV[1])
local lease = tonumber(ARGV[2])
local function left()
  return redis.call('LLEN', KEYS[9]) + redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[10])
end
local budget = 1000
for _, queue in ipairs({KEYS[9], KEYS[1], KEYS[10]}) do
  while budget > 0 do
    budget = budget - 1
    local id = redis.call('LPOP', queue)
    if not id then break end
    local state = redis.call('HGET', KEYS[4], id)
    local job = (not state or state == 'queued') and redis.call('HGET', KEYS[3], id)
    if job then
      redis.call('ZADD', KEYS[2], now + lease, id)
      redis.call('HSET', KEYS[4], id, 'leased')
      local attempt = redis.call('HINCRBY', KEYS[5], id, 1)
      local batch_id = string.match(id, '^([^:]*):') or ''
      local meta = redis.call('HGET', KEYS[6], batch_id) or ''
      local canceled = redis.call('SISMEMBER', KEYS[7], batch_id)
      local has_policy = redis.call('EXISTS', KEYS[8])
      return {id, job, attempt, left(), meta, now, canceled, has_policy}
    end
  end
end
return {'', '', 0, left(), '', now, 0, 0}
