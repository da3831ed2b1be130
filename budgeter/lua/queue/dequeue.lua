--[[ queue/dequeue.lua — take the jobs at the head of one tenant's queues under a lease (one, or
up to ARGV[3]).
-- needs: lib/periods.lua
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
ARGV[3] how many jobs to take at most ('' = 1)

Returns {jobs left in the queues, now, has_policy, then for each job taken: job id,
params JSON, attempt, batch meta, canceled}; no job when the queues are empty. canceled is
1 when the job's batch is being canceled: the caller acks it as canceled instead of
serving it. Job ids are '<batch id>:<custom_id>'.
]]
local now = server_now(ARGV[1])
local lease = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3]) or 1
local has_policy = redis.call('EXISTS', KEYS[8])
local reply = {0, now, has_policy}
local metas, canceled = {}, {}
local taken = 0
local budget = 1000 + wanted
for _, queue in ipairs({KEYS[9], KEYS[1], KEYS[10]}) do
  while budget > 0 and taken < wanted do
    budget = budget - 1
    local id = redis.call('LPOP', queue)
    if not id then break end
    local state = redis.call('HGET', KEYS[4], id)
    local job = (not state or state == 'queued') and redis.call('HGET', KEYS[3], id)
    if job then
      taken = taken + 1
      redis.call('ZADD', KEYS[2], now + lease, id)
      redis.call('HSET', KEYS[4], id, 'leased')
      local attempt = redis.call('HINCRBY', KEYS[5], id, 1)
      local batch_id = string.match(id, '^([^:]*):') or ''
      if metas[batch_id] == nil then
        metas[batch_id] = redis.call('HGET', KEYS[6], batch_id) or ''
        canceled[batch_id] = redis.call('SISMEMBER', KEYS[7], batch_id)
      end
      local n = #reply
      reply[n + 1], reply[n + 2], reply[n + 3] = id, job, attempt
      reply[n + 4], reply[n + 5] = metas[batch_id], canceled[batch_id]
    end
  end
end
reply[1] = redis.call('LLEN', KEYS[9]) + redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[10])
return reply
