--[[ admission/pause.lua — pause a scope until a moment, never shortening a longer pause.

KEYS[1] hash   where the pause is kept
ARGV[1] field  (e.g. 'paused_until', or a model name in {global}:pauses)
ARGV[2] ms     pause length, counted from Redis server TIME

Returns the paused-until moment (ms, Redis time) now in force.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wanted = now + tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
if wanted > current then
  redis.call('HSET', KEYS[1], ARGV[1], wanted)
  return wanted
end
return current
