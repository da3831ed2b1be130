--[[ lib/hash_cache.lua — a write-back cache of hash fields, prepended by budgeter/scripts.py
to every script that names "-- needs: lib/hash_cache.lua". Not a script on its own.

A script that decides many requests in one call reads each field once, keeps what it
writes in the cache, so the next request of the same call sees it, and writes every
changed field back with one HSET per hash at the end. The result is exactly what one
call per request, one after the other, would have stored.

hprefetch(key, fields)     read many fields with one HMGET
hget(key, field)        -> the value (a string, or a number set by hset), or nil when absent
hset(key, field, value)    set in the cache (written by flush; a number is written as
                           redis.call would write it, '%.17g', which reads back exactly)
hdel(key, field)           delete in the cache (deleted by flush)
flush()                    HSET the changed fields, HDEL the deleted ones, per hash
]]
local hc_values, hc_dirty = {}, {}

local function hget(key, field)
  local values = hc_values[key]
  if not values then
    values = {}
    hc_values[key] = values
  end
  local value = values[field]
  if value == nil then
    value = redis.call('HGET', key, field)
    values[field] = value
  end
  if value == false then return nil end
  return value
end

local function hprefetch(key, fields)
  if #fields == 0 then return end
  local values = hc_values[key]
  if not values then
    values = {}
    hc_values[key] = values
  end
  for i = 1, #fields, 1000 do
    local got = redis.call('HMGET', key, unpack(fields, i, math.min(i + 999, #fields)))
    for j = 1, #got do
      local field = fields[i + j - 1]
      if values[field] == nil then values[field] = got[j] end
    end
  end
end

local function hset(key, field, value)
  if not hc_values[key] then hc_values[key] = {} end
  if not hc_dirty[key] then hc_dirty[key] = {} end
  hc_values[key][field] = value
  hc_dirty[key][field] = true
end

local function hdel(key, field)
  hset(key, field, false)
end

local function flush()
  for key, fields in pairs(hc_dirty) do
    local sets, dels = {}, {}
    for field in pairs(fields) do
      local value = hc_values[key][field]
      if value == false then
        dels[#dels + 1] = field
      else
        sets[#sets + 1] = field
        if type(value) == 'number' then value = string.format('%.17g', value) end
        sets[#sets + 1] = value
      end
    end
    for i = 1, #sets, 1000 do
      redis.call('HSET', key, unpack(sets, i, math.min(i + 999, #sets)))
    end
    for i = 1, #dels, 500 do
      redis.call('HDEL', key, unpack(dels, i, math.min(i + 499, #dels)))
    end
  end
  hc_dirty = {}
end
