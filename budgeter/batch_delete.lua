--[[ batch_delete.lua — delete an ended batch and every trace of its jobs.

KEYS[1] batch       hash
KEYS[2] batch_jobs  list
KEYS[3] batches     zset  batch id -> created ms
KEYS[4] jobs  KEYS[5] jstate  KEYS[6] jmeta  KEYS[7] attempts  KEYS[8] results   (hashes by job id)
KEYS[9] canceled_batches  set
ARGV[1] batch id

Returns 1 when deleted, the error 'not_found', or the error 'not_ended' while jobs are
still processing.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('not_found') end
if (tonumber(redis.call('HGET', KEYS[1], 'processing')) or 0) > 0 then
  return redis.error_reply('not_ended')
end
local n = redis.call('LLEN', KEYS[2])
local chunk = 1000
for start = 0, n - 1, chunk do
  local ids = redis.call('LRANGE', KEYS[2], start, start + chunk - 1)
  for k = 4, 8 do redis.call('HDEL', KEYS[k], unpack(ids)) end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[9], ARGV[1])
return 1
