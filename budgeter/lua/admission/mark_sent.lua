--[[ admission/mark_sent.lua — record that the upstream may now be called, while the reservation is
still held. A reservation the reaper released (its worker looked dead: stalled past its
lease and grace, or cut off from Redis) must not be sent: the upstream would serve what no
budget is charged for, and the mark would outlive the reservation.

KEYS[1] resv       hash  reservation id -> reservation JSON
KEYS[2] resv_sent  hash  reservation id -> 1 once the upstream may have been called
ARGV[1] reservation id

Returns 1 when marked, 0 when the reservation is gone (settled or reaped).
]]
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], '1')
return 1
