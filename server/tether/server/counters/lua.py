"""Every Lua script, as a named constant. Each runs atomically in one round trip."""

from __future__ import annotations

# --- binding -------------------------------------------------------------

# KEYS[1]: window counter. ARGV[1]: limit, ARGV[2]: window length in ms.
# Returns {allowed (1/0), count, ms until the window ends}.
RATE_LIMIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local ttl = redis.call('PTTL', KEYS[1])
if count > tonumber(ARGV[1]) then
  return {0, count, ttl}
end
return {1, count, ttl}
"""

# --- fingerprint guard (owned by tether.server.guard) ---------------------
# The guard's counters are sorted sets: member = account digest, score =
# expiry in Unix ms (GUARD_FOREVER: never). Time comes from Redis (TIME), so
# every server instance agrees on it. Each script prunes expired members,
# then keeps the key's own expiry at its latest member's, so nothing lingers.

# KEYS[1]: the set. ARGV[1]: member, ARGV[2]: limit (0: none), ARGV[3]:
# lifetime in ms (0: forever), ARGV[4]: 1 to record even over the limit
# (shadow mode), ARGV[5]: 1 to extend an existing member's expiry (logins,
# rooms). Returns {allowed 1/0, 1 if already counted, count, expiry ms}.
GUARD_EVALUATE = """
local key, member = KEYS[1], ARGV[1]
local limit, life = tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = 9007199254740991
if life > 0 then expiry = now + life end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local old = redis.call('ZSCORE', key, member)
local count = redis.call('ZCARD', key)
if old then
  if ARGV[5] == '1' and tonumber(old) < expiry then
    redis.call('ZADD', key, expiry, member)
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', key, last[2])
  else
    expiry = tonumber(old)
  end
  return {1, 1, count, expiry}
end
if limit > 0 and count >= limit and ARGV[4] ~= '1' then
  return {0, 0, count, 0}
end
redis.call('ZADD', key, expiry, member)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if tonumber(last[2]) >= 9007199254740991 then
  redis.call('PERSIST', key)
else
  redis.call('PEXPIREAT', key, last[2])
end
return {1, 0, count + 1, expiry}
"""

# KEYS[1]: a login set. ARGV[1]: member, ARGV[2]: lifetime in ms.
# Returns the new expiry in ms, or 0 if the member is gone (ended, expired).
GUARD_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not old or tonumber(old) <= now then return 0 end
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return expiry
"""

# KEYS[1]: a set. ARGV: member, expiry ms, member, expiry ms, ...
# Restores entries (GUARD_FOREVER for none) that are still valid; returns
# how many were added.
GUARD_RESTORE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local added = 0
for i = 1, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) > now then
    added = added + redis.call('ZADD', KEYS[1], 'GT', ARGV[i + 1], ARGV[i])
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] == nil then return added end
if tonumber(last[2]) >= 9007199254740991 then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], last[2])
end
return added
"""
