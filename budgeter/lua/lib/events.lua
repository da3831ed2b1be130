--[[ lib/events.lua — helpers prepended by budgeter/scripts.py to every script that names
"-- needs: lib/events.lua". Not a script on its own. The entry's
fields and each type's data are described in budgeter/notify/events.py (their one home).

notify_wanted(outbox, policy) -> true when the script was given the tenant's outbox and its
                                 policy hash has a 'notify' field (the rule settle.lua
                                 follows: no notify policy, no outbox growth)
emit_event(outbox, kind, data) appends one entry, fields 'type' and 'data' (JSON), trimmed
                                 to about 10,000 entries (MAXLEN ~) as settle.lua trims it
batch_ended(outbox, batch, batch_id) -> 1: appends 'batch.ended' with the batch hash's
                                 request counts (call it once, when the batch ends)
]]
local function notify_wanted(outbox, policy)
  return outbox ~= nil and redis.call('HEXISTS', policy, 'notify') == 1
end

local function emit_event(outbox, kind, data)
  redis.call('XADD', outbox, 'MAXLEN', '~', 10000, '*', 'type', kind, 'data', cjson.encode(data))
end

local function batch_ended(outbox, batch, batch_id)
  local names = {'processing', 'succeeded', 'errored', 'canceled', 'expired'}
  local values = redis.call('HMGET', batch, unpack(names))
  local counts = {}
  for k, name in ipairs(names) do counts[name] = tonumber(values[k]) or 0 end
  emit_event(outbox, 'batch.ended', {batch_id = batch_id, request_counts = counts})
  return 1
end
