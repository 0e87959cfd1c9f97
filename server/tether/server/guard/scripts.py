"""The guard's Lua scripts, as named constants. Each runs atomically in one round trip."""

from __future__ import annotations

# The guard's counters are hashes of one bucket of fingerprints: field =
# 16-byte identity .. 8-byte account digest, value = expiry in Unix ms
# (9007199254740991: never). Time comes from Redis (TIME), so every server
# instance agrees on it. Each script prunes the bucket's expired fields and
# keeps the key's own expiry at its latest field's, so nothing lingers.

# KEYS[1]: the bucket. ARGV[1]: identity (16 bytes), ARGV[2]: account (8
# bytes), ARGV[3]: limit (0: none), ARGV[4]: lifetime in ms (0: forever),
# ARGV[5]: '1' to record even over the limit (shadow mode), ARGV[6]: '1' to
# extend an existing entry's expiry (logins, rooms).
# Returns {allowed 1/0, already counted 1/0, count, expiry ms (0: none)}.
EVALUATE = """
local key, ident = KEYS[1], ARGV[1]
local mine = ident .. ARGV[2]
local limit, life = tonumber(ARGV[3]), tonumber(ARGV[4])
local forever = 9007199254740991
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = forever
if life > 0 then expiry = now + life end
local all = redis.call('HGETALL', key)
local count, old, latest, dead = 0, nil, 0, {}
for i = 1, #all, 2 do
  local field, e = all[i], tonumber(all[i + 1])
  if e <= now then
    dead[#dead + 1] = field
  else
    if e > latest then latest = e end
    if string.sub(field, 1, 16) == ident then
      count = count + 1
      if field == mine then old = e end
    end
  end
end
for i = 1, #dead, 500 do
  redis.call('HDEL', key, unpack(dead, i, math.min(i + 499, #dead)))
end
if old then
  if ARGV[6] == '1' and old < expiry then
    redis.call('HSET', key, mine, expiry)
  else
    expiry = old
  end
elseif limit > 0 and count >= limit and ARGV[5] ~= '1' then
  return {0, 0, count, 0}
else
  redis.call('HSET', key, mine, expiry)
  count = count + 1
end
if expiry > latest then latest = expiry end
if latest >= forever then
  redis.call('PERSIST', key)
elseif latest > 0 then
  redis.call('PEXPIREAT', key, latest)
end
if old then return {1, 1, count, expiry} end
return {1, 0, count, expiry}
"""

# KEYS[1]: a login bucket. ARGV[1]: field (identity .. account), ARGV[2]:
# lifetime in ms. Returns the new expiry in ms, or 0 if the session is gone.
RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if not old or old <= now then return 0 end
local expiry = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], expiry)
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= 0 and now + ttl < expiry then
  redis.call('PEXPIREAT', KEYS[1], expiry)
end
return expiry
"""

# KEYS[1]: a bucket. ARGV: field, expiry ms, field, expiry ms, ...
# Restores still-valid entries, never shortening one; returns how many
# fields were added.
RESTORE = """
local forever = 9007199254740991
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local added = 0
for i = 1, #ARGV, 2 do
  local e = tonumber(ARGV[i + 1])
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if e > now and (not old or old < e) then
    redis.call('HSET', KEYS[1], ARGV[i], e)
    if not old then added = added + 1 end
  end
end
local latest = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 2, #all, 2 do
  local e = tonumber(all[i])
  if e > latest then latest = e end
end
if latest >= forever then
  redis.call('PERSIST', KEYS[1])
elseif latest > 0 then
  redis.call('PEXPIREAT', KEYS[1], latest)
end
return added
"""
