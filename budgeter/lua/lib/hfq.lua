--[[ lib/hfq.lua — hierarchical fair queueing over the organisation tree, prepended by
budgeter/store/scripts.py to every script that names "-- needs: lib/hfq.lua". Not a script
on its own. All keys share the {sched} tag of the scheduler.

base .. ':' .. node   zset, one per tree node ('' the root): member -> virtual time at that
                      level. A member is a child of node whose subtree has ready work, or
                      node itself for its own work (a leaf's zset holds only itself).
base .. '|v'          hash  'node|member' -> last virtual time; 'node|' -> the level's clock
parents               hash  tenant -> parent (absent for a root)

Weights are shares among siblings: at each level the lowest virtual time is served and
advances by cost / weight (a tenant's own work beside its children counts weight 1), so
a parent's share is split among its backlogged children in proportion to their weights.
Entries go stale (a tenant left the ready set, or was re-parented) and are dropped (or
re-attached under the new parent) when a pick finds them.

hfq_enter(base, parents, tenant)   a ready tenant enters its own zset and its ancestors'
hfq_pick(base, parents, ready)  -> tenant, path: the ready tenant to serve, and the list of
                                   {node, member, score} from the root to its own entry
hfq_advance(base, path, cost, weights)  advance every level of path by cost / weight
]]
local function hfq_add(base, node, member)
  local z = base .. ':' .. node
  if redis.call('ZSCORE', z, member) then return false end
  local v = tonumber(redis.call('HGET', base .. '|v', node .. '|' .. member)) or 0
  local clock = tonumber(redis.call('HGET', base .. '|v', node .. '|')) or 0
  if clock > v then v = clock end
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) > v then v = tonumber(first[2]) end
  redis.call('ZADD', z, v, member)
  return true
end

local function hfq_attach(base, parents, member)
  for _ = 1, 8 do
    local node = redis.call('HGET', parents, member) or ''
    if not hfq_add(base, node, member) or node == '' then return end
    member = node
  end
end

local function hfq_enter(base, parents, tenant)
  if hfq_add(base, tenant, tenant) then hfq_attach(base, parents, tenant) end
end

local function hfq_pick(base, parents, ready)
  for _ = 1, 64 do
    local path = {}
    local node = ''
    local found = nil
    for _ = 1, 8 do
      local top = redis.call('ZRANGE', base .. ':' .. node, 0, 0, 'WITHSCORES')
      if not top[1] then break end
      local m = top[1]
      path[#path + 1] = {node, m, tonumber(top[2])}
      if m == node then
        if redis.call('ZSCORE', ready, m) then found = m end
        break
      end
      if (redis.call('HGET', parents, m) or '') ~= node then
        hfq_attach(base, parents, m)  -- re-parented: its subtree moves (dropped below)
        break
      end
      node = m
    end
    if found then return found, path end
    if #path == 0 then return nil, path end
    -- the last entry is stale (its tenant is not ready, its zset empty, or it moved): drop
    -- it; an emptied zset above is dropped in turn by a later pass
    redis.call('ZREM', base .. ':' .. path[#path][1], path[#path][2])
  end
  return nil, {}
end

local function hfq_advance(base, path, cost, weights)
  for _, entry in ipairs(path) do
    local node, member = entry[1], entry[2]
    local w = 1
    if member ~= node then w = tonumber(redis.call('HGET', weights, member)) or 1 end
    local v = entry[3] + cost / w
    redis.call('ZADD', base .. ':' .. node, v, member)
    redis.call('HSET', base .. '|v', node .. '|' .. member, v, node .. '|', entry[3])
  end
end
