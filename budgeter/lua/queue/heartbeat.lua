--[[ queue/heartbeat.lua — extend a job's lease and its reservation's deadline while it runs.
-- needs: lib/periods.lua

KEYS[1] leases         zset
KEYS[2] resv_deadline  zset
ARGV[1] now in ms, or ''
ARGV[2] job id
ARGV[3] lease ms
ARGV[4] reservation id, or '' when none yet
ARGV[5] reservation hold ms

Returns 1 while the lease is held, 0 once it was lost (reclaimed by another worker).
]]
local now = server_now(ARGV[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[2])
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[5]), ARGV[4])
end
return 1
