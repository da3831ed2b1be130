--[[ queue/reclaim.lua — put back the jobs whose lease expired (their worker died or hung).
-- needs: lib/periods.lua

KEYS[1] leases    zset  job id -> lease expiry (ms)
KEYS[2] queue     list  priority normal
KEYS[3] jstate    hash
KEYS[4] attempts  hash
KEYS[5] bmeta     hash  batch id -> '<enqueued ms> <deadline ms> [priority]'
KEYS[6] queue_high list priority high
KEYS[7] queue_low  list priority low
ARGV[1] now in ms, or ''
ARGV[2] max attempts: a job that used them all is returned for dead-lettering
ARGV[3] max jobs per call

Returns {requeued, dead job id, ...}. Dead jobs keep a lease (now + 60 s) until the
caller acks them, so a crash before that only delays them.
]]
local now = server_now(ARGV[1])
local max_attempts = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {0}
for _, id in ipairs(due) do
  if (tonumber(redis.call('HGET', KEYS[4], id)) or 0) >= max_attempts then
    redis.call('ZADD', KEYS[1], now + 60000, id)
    table.insert(out, id)
  else
    redis.call('ZREM', KEYS[1], id)
    if redis.call('HGET', KEYS[3], id) == 'leased' then
      redis.call('HSET', KEYS[3], id, 'queued')
      local meta = redis.call('HGET', KEYS[5], string.match(id, '^([^:]*):') or '') or ''
      local prio = string.match(meta, '^%S+ %S+ (%a+)')
      local queue = KEYS[2]
      if prio == 'high' then queue = KEYS[6] elseif prio == 'low' then queue = KEYS[7] end
      redis.call('LPUSH', queue, id)
      out[1] = out[1] + 1
    end
  end
end
return out
