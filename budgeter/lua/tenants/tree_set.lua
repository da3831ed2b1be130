--[[ tenants/tree_set.lua — change the organisation tree (tenant -> parent) if, and only
if, it is still the version the caller read and checked (compare and set: the checks of
budgeter/domain/tree.py run in Python on the tree read with its version; a concurrent
change makes the caller read and check again).

KEYS[1] parents  hash    tenant -> parent tenant ('' for a root); every tenant with a policy
KEYS[2] version  string  incremented by every change of the tree
ARGV[1] the version the caller read ('' when the key did not exist), or '*' to apply without
        comparing (only for making tenants roots: a root has no parent, so it can close no
        cycle and make no chain deeper, whatever the tree is; a checker racing it still
        reads again, as the version moves)
ARGV[2..] triples: op ('set' or 'del'), tenant, parent ('' for a root; ignored by 'del')

Returns 1 when applied (and the version incremented), 0 when the tree changed meanwhile
(nothing written).
]]
local version = redis.call('GET', KEYS[2]) or ''
if ARGV[1] ~= '*' and version ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 3 do
  if ARGV[i] == 'del' then
    redis.call('HDEL', KEYS[1], ARGV[i + 1])
  else
    redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  end
end
redis.call('INCR', KEYS[2])
return 1
