--[[ lib/prices.lua — the price argument, prepended by budgeter/scripts.py to every script that
names "-- needs: lib/prices.lua". Not a script on its own.

The format (its home: budgeter/domain/price_arg.py), US dollars per million tokens:
  '<input> <output> <cache_write> <cache_read>[ <above> <input> <output> <cache_write> <cache_read>]...'
base prices, then long-context tiers by ascending threshold: a request whose input tokens
(input + cache creation + cache read) are more than <above> pays that tier's prices on all
its tokens (the last tier it is over).

prices_parse(arg)                  -> nil for '', else {base = {4 prices}, tiers = {{above, {4 prices}}, ...}}
                                      (parsed once per distinct string in a call)
prices_at(p, input_tokens)         -> the 4 prices of a request of input_tokens input tokens
prices_reserve(p, input, output)   -> US dollars: the dearest a request of input (count_tokens)
                                      and output (max_tokens) tokens can cost, all its input
                                      written to the cache, in any tier it can fall in (its own
                                      or a lower one: the real input may be less than counted)
prices_usage(p, a_in, a_out, a_cc, a_cr) -> US dollars of a real usage, at its tier
]]
local prices_parsed = {}

local function prices_parse(arg)
  if arg == nil or arg == '' then return nil end
  local p = prices_parsed[arg]
  if p then return p end
  local x = {}
  for n in string.gmatch(arg, '%S+') do x[#x + 1] = tonumber(n) end
  p = {base = {x[1], x[2], x[3], x[4]}, tiers = {}}
  for i = 5, #x, 5 do
    p.tiers[#p.tiers + 1] = {x[i], {x[i + 1], x[i + 2], x[i + 3], x[i + 4]}}
  end
  prices_parsed[arg] = p
  return p
end

local function prices_at(p, input_tokens)
  local found = p.base
  for _, tier in ipairs(p.tiers) do
    if input_tokens > tier[1] then found = tier[2] end
  end
  return found
end

local function prices_reserve(p, input, output)
  local r = p.base
  local usd = (input * math.max(r[1], r[3]) + output * r[2]) / 1000000
  for _, tier in ipairs(p.tiers) do
    if input > tier[1] then
      r = tier[2]
      usd = math.max(usd, (input * math.max(r[1], r[3]) + output * r[2]) / 1000000)
    end
  end
  return usd
end

local function prices_usage(p, a_in, a_out, a_cc, a_cr)
  local r = prices_at(p, a_in + a_cc + a_cr)
  return (a_in * r[1] + a_out * r[2] + a_cc * r[3] + a_cr * r[4]) / 1000000
end
