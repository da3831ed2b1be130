--[[ tenants/key_used.lua — record when a tenant API key was last used, only while the key
exists (a key revoked, or a tenant deleted, meanwhile leaves no trace behind).

KEYS[1] api_keys       hash  key id -> the key's meta JSON
KEYS[2] api_keys_used  hash  key id -> when it was last used (ms)
ARGV[1] key id
ARGV[2] now in ms

Returns 1 when recorded, 0 when the key is gone.
]]
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
