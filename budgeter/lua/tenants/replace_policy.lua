--[[ tenants/replace_policy.lua — replace a tenant's flat policy hash if, and only if, it
still holds the policy the caller read (compare and set: a JSON merge patch is read,
merged and validated in Python, then written here; a concurrent change makes the caller
read and merge again).

KEYS[1] policy  hash  the flat policy (TenantPolicy.redis_fields; field 'json' the policy)
ARGV[1] the 'json' field the caller read
ARGV[2..] field, value, field, value, ... of the new policy hash

Returns 1 when replaced, 0 when the stored policy changed meanwhile (nothing written), or
-1 when the tenant has no policy (deleted meanwhile; nothing written).
]]
local current = redis.call('HGET', KEYS[1], 'json')
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
