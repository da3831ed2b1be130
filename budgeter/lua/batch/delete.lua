--[[ batch/delete.lua — delete an ended batch and every trace of its jobs.
-- needs: lib/batch_jobs.lua

KEYS[1] batch       hash
KEYS[2] batch_cids  list  the batch's custom ids, each element a JSON array of up to 1,000
KEYS[3] batches     zset  batch id -> created ms
KEYS[4] jobs  KEYS[5] jstate  KEYS[6] attempts  KEYS[7] results   (hashes by job id)
KEYS[8] bmeta       hash  batch id -> '<enqueued ms> <deadline ms> [priority]'
KEYS[9] canceled_batches  set
ARGV[1] batch id

Returns 1 when deleted, the error 'not_found', or the error 'not_ended' while jobs are
still processing.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('not_found') end
if (tonumber(redis.call('HGET', KEYS[1], 'processing')) or 0) > 0 then
  return redis.error_reply('not_ended')
end
for_each_job_chunk(KEYS[2], ARGV[1], function(ids)
  for k = 4, 7 do redis.call('HDEL', KEYS[k], unpack(ids)) end
end)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HDEL', KEYS[8], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[9], ARGV[1])
return 1
