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
