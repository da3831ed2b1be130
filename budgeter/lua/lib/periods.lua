--[[ lib/periods.lua — helpers prepended by budgeter/scripts.py to every script that
names "-- needs: lib/periods.lua". Not a script on its own.

server_now(arg)       -> ms: tonumber(arg) when a test passes a time, else Redis TIME
period_of(period, ms) -> id, end_ms: the UTC calendar period containing ms
                         ('total' -> 'total', 0 = never resets)
fmt(x)                -> x as a decimal string with 3 decimals (keeps sub-ms precision)
fmt6(x)               -> x with 6 decimals (US dollars to the micro-dollar)
]]
local function server_now(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function period_of(period, ms)
  if period == 'total' then return 'total', 0 end
  local days = math.floor(ms / 86400000)
  local y, m, d = civil_from_days(days)
  local date = string.format('%04d-%02d-%02d', y, m, d)
  if period == 'day' then return date, (days + 1) * 86400000 end
  if period == 'hour' then
    local h = math.floor(ms / 3600000)
    return string.format('%sT%02d', date, h % 24), (h + 1) * 3600000
  end
  if period == 'minute' then
    local mi = math.floor(ms / 60000)
    return string.format('%sT%02d:%02d', date, math.floor(mi / 60) % 24, mi % 60), (mi + 1) * 60000
  end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return string.format('%04d-%02d', y, m), days_from_civil(ny, nm, 1) * 86400000
end

local function fmt(x)
  return string.format('%.3f', x)
end

local function fmt6(x)
  return string.format('%.6f', x)
end
