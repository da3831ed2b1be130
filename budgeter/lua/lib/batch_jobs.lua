--[[ lib/batch_jobs.lua — a helper prepended by budgeter/scripts.py to every script that
names "-- needs: lib/batch_jobs.lua". Not a script on its own.

for_each_job_chunk(order_key, batch_id, fn)
    walks a batch's custom-id order list (each element a JSON array of up to 1,000 custom
    ids, read 100 elements at a time) and calls fn(ids, cids) for each non-empty element:
    cids its custom ids, ids the matching job ids '<batch id>:<custom id>'
]]
local function for_each_job_chunk(order_key, batch_id, fn)
  local prefix = batch_id .. ':'
  local n = redis.call('LLEN', order_key)
  for start = 0, n - 1, 100 do
    for _, packed in ipairs(redis.call('LRANGE', order_key, start, start + 99)) do
      local cids = cjson.decode(packed)
      if #cids > 0 then
        local ids = {}
        for k, cid in ipairs(cids) do ids[k] = prefix .. cid end
        fn(ids, cids)
      end
    end
  end
end
