--[[ batch/cancel.lua — cancel a batch: every job still queued ends as canceled at once;
jobs already leased finish as they are. Idempotent.
-- needs: lib/periods.lua
-- needs: lib/batch_jobs.lua
-- needs: lib/events.lua

KEYS[1] batch       hash  batch meta and counts
KEYS[2] batch_cids  list  the batch's custom ids, each element a JSON array of up to 1,000
KEYS[3] jstate      hash  job id -> state (a job of the batch without one is queued)
KEYS[4] results     hash  job id -> result line
KEYS[5] jobs        hash  (unused: a job id is '<batch id>:<custom_id>')
KEYS[6] canceled_batches  set  (a job of the batch leased meanwhile is not served)
KEYS[7] outcomes    hash  cumulative jobs per terminal state (optional)
KEYS[8] policy      hash  the tenant's policy: events only when it has a 'notify' field
                          (optional, with KEYS[9])
KEYS[9] outbox      stream (optional) notification events (lib/events.lua,
                          budgeter/notify/events.py): 'batch.ended' when this call ends
                          the batch (every job of it has a terminal state)
ARGV[1] now in ms, or ''
ARGV[2] batch id

Returns {jobs canceled by this call, notification events appended}, or the error
'not_found'. A batch ends once: ended_ms is set only when absent.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('not_found') end
local now = server_now(ARGV[1])
if not redis.call('HGET', KEYS[1], 'cancel_initiated_ms') then
  redis.call('HSET', KEYS[1], 'cancel_initiated_ms', now)
end
redis.call('SADD', KEYS[6], ARGV[2])
local canceled, events = 0, 0
for_each_job_chunk(KEYS[2], ARGV[2], function(ids, cids)
  local states = redis.call('HMGET', KEYS[3], unpack(ids))
  local new_states, lines = {}, {}
  for k, id in ipairs(ids) do
    if not states[k] or states[k] == 'queued' then
      table.insert(new_states, id); table.insert(new_states, 'canceled')
      table.insert(lines, id)
      table.insert(lines, cjson.encode({custom_id = cids[k], result = {type = 'canceled'}}))
      canceled = canceled + 1
    end
  end
  if #new_states > 0 then
    redis.call('HSET', KEYS[3], unpack(new_states))
    redis.call('HSET', KEYS[4], unpack(lines))
  end
end)
if canceled > 0 then
  local left = redis.call('HINCRBY', KEYS[1], 'processing', -canceled)
  redis.call('HINCRBY', KEYS[1], 'canceled', canceled)
  if KEYS[7] then redis.call('HINCRBY', KEYS[7], 'canceled', canceled) end
  if left <= 0 and redis.call('HSETNX', KEYS[1], 'ended_ms', now) == 1 then
    if notify_wanted(KEYS[9], KEYS[8]) then events = batch_ended(KEYS[9], KEYS[1], ARGV[2]) end
  end
end
return {canceled, events}
