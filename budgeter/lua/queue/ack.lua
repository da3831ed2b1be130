--[[ queue/ack.lua — record a job's terminal state and result, exactly once.
-- needs: lib/periods.lua
-- needs: lib/events.lua

KEYS[1] leases   zset
KEYS[2] jstate   hash  job id -> state
KEYS[3] results  hash  job id -> result line JSON
KEYS[4] batch    hash  request counts of the job's batch
KEYS[5] dead     list  the last 10,000 dead-lettered job ids (newest last)
KEYS[6] outcomes hash  cumulative jobs per terminal state
KEYS[7] jobs     hash  job id -> params JSON (a job there without a state is queued)
KEYS[8] attempts hash  job id -> attempts (optional, with KEYS[9] and KEYS[10])
KEYS[9] policy   hash  the tenant's policy: events only when it has a 'notify' field
KEYS[10] outbox  stream (optional) notification events (lib/events.lua,
                 budgeter/notify/events.py): 'job.dead_lettered' when this call stores a
                 dead-lettered job's result; 'batch.ended' when it ends the job's batch
ARGV[1] job id ('<batch id>:<custom_id>')
ARGV[2] outcome: succeeded | errored | canceled | expired
ARGV[3] result line JSON ({"custom_id": ..., "result": {...}})
ARGV[4] now in ms, or ''
ARGV[5] '1' when the job is dead-lettered

Returns {recorded, events}: recorded 1 when recorded, 0 when the job already had a terminal
state (or is unknown: then nothing changes); events the notification events appended.
A batch ends once: ended_ms is set only when absent (a retried submission that adds jobs
clears it, and the batch can end again).
]]
local id = ARGV[1]
local outcome = ARGV[2]
local state = redis.call('HGET', KEYS[2], id)
if not state and redis.call('HEXISTS', KEYS[7], id) == 1 then state = 'queued' end
redis.call('ZREM', KEYS[1], id)
if state ~= 'queued' and state ~= 'leased' then return {0, 0} end
redis.call('HSET', KEYS[2], id, outcome)
redis.call('HSET', KEYS[3], id, ARGV[3])
local notify = notify_wanted(KEYS[10], KEYS[9])
local events = 0
local batch_id, custom_id = string.match(id, '^([^:]*):(.*)$')
if ARGV[5] == '1' then
  redis.call('RPUSH', KEYS[5], id)
  redis.call('LTRIM', KEYS[5], -10000, -1)
  if notify then
    local ok, line = pcall(cjson.decode, ARGV[3])
    local err = ok and type(line) == 'table' and type(line.result) == 'table'
      and type(line.result.error) == 'table' and line.result.error.error
    local error_type = type(err) == 'table' and type(err.type) == 'string' and err.type
    emit_event(KEYS[10], 'job.dead_lettered', {job_id = id, batch_id = batch_id,
      custom_id = custom_id, error_type = error_type or cjson.null,
      attempts = tonumber(redis.call('HGET', KEYS[8], id)) or 0})
    events = events + 1
  end
end
local left = redis.call('HINCRBY', KEYS[4], 'processing', -1)
redis.call('HINCRBY', KEYS[4], outcome, 1)
redis.call('HINCRBY', KEYS[6], outcome, 1)
if left <= 0 and redis.call('HSETNX', KEYS[4], 'ended_ms', server_now(ARGV[4])) == 1 then
  if notify then events = events + batch_ended(KEYS[10], KEYS[4], batch_id) end
end
return {1, events}
