--[[ queue/ack.lua — record a job's terminal state and result, exactly once.
-- needs: lib/periods.lua

KEYS[1] leases   zset
KEYS[2] jstate   hash  job id -> state
KEYS[3] results  hash  job id -> result line JSON
KEYS[4] batch    hash  request counts of the job's batch
KEYS[5] dead     list  the last 10,000 dead-lettered job ids (newest last)
KEYS[6] outcomes hash  cumulative jobs per terminal state
KEYS[7] jobs     hash  job id -> params JSON (a job there without a state is queued)
ARGV[1] job id
ARGV[2] outcome: succeeded | errored | canceled | expired
ARGV[3] result line JSON ({"custom_id": ..., "result": {...}})
ARGV[4] now in ms, or ''
ARGV[5] '1' when the job is dead-lettered

Returns 1 when recorded, 0 when the job already had a terminal state (or is unknown).
]]
local id = ARGV[1]
local outcome = ARGV[2]
local state = redis.call('HGET', KEYS[2], id)
if not state and redis.call('HEXISTS', KEYS[7], id) == 1 then state = 'queued' end
redis.call('ZREM', KEYS[1], id)
if state ~= 'queued' and state ~= 'leased' then return 0 end
redis.call('HSET', KEYS[2], id, outcome)
redis.call('HSET', KEYS[3], id, ARGV[3])
if ARGV[5] == '1' then
  redis.call('RPUSH', KEYS[5], id)
  redis.call('LTRIM', KEYS[5], -10000, -1)
end
local left = redis.call('HINCRBY', KEYS[4], 'processing', -1)
redis.call('HINCRBY', KEYS[4], outcome, 1)
redis.call('HINCRBY', KEYS[6], outcome, 1)
if left <= 0 then redis.call('HSET', KEYS[4], 'ended_ms', server_now(ARGV[4])) end
return 1
