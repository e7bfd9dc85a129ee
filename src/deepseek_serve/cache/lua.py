"""Lua shared by the Redis scripts of the limiter and the guards: the server clock, and the token
bucket every limit uses (a hash with the level `l` and the time `t` of its last update, refilled at
`cap` per minute, expiring once it would be full again)."""

# `now`: the Redis server's clock in ms (one clock for every process sharing the budget)
NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# `refilled(key, cap)`: the bucket's level refilled to `now` (nil when it does not exist: full);
# `store(key, cap, level)`: write it back, expiring when it would be full again
BUCKET = (
    NOW
    + """
local window = 60000

local function refilled(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local level, ts = tonumber(v[1]), tonumber(v[2])
  if level == nil or ts == nil then return nil end
  return math.min(cap, level + math.max(0, now - ts) * cap / window)
end

local function store(key, cap, level)
  redis.call('HSET', key, 'l', tostring(level), 't', now)
  redis.call('PEXPIRE', key, math.ceil((cap - level) * window / cap) + 1000)
end
"""
)
