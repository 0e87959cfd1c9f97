"""The guard's Lua scripts, as named constants. Each runs atomically in one
round trip, so a check and its record can never be split by another call.

One hash per (service, action, room, identity) (guard/keys.py). Fields:

- `a<member>`: one counted account (member: its digest's 8 bytes) ->
  "<admitted ms>|<expiry ms>|<network>" (network: 16 hex characters).
- `n<network>`: the accounts counted from one network ->
  "<admitted ms>:<expiry ms>" pairs, space-separated.
- `w`: when the registrations of the last day were admitted, ms,
  space-separated (the velocity windows).
- `f`: present once the identity was refused as one browser: it is being
  farmed, and from then on every network counts for it.
- `x`: the latest expiry of any entry, ms: the key's own expiry.

Expiry 9007199254740991 means never. Time is the caller's (a backtest
replays history) or, when the caller passes 0, Redis's own (TIME), so every
server agrees on it.
"""

from __future__ import annotations

_COMMON = """
local forever = 9007199254740991
local day = 86400000
-- Numbers as digits: Lua's own tostring writes 16-digit ones in
-- exponent form.
local function int(x) return string.format('%d', x) end
-- A caller's own time means a replay (a backtest): its keys live until the
-- replay drops them, whatever their entries' expiry in Redis's time.
local replay = false
local function now_of(arg)
  local given = tonumber(arg)
  if given and given > 0 then
    replay = true
    return given
  end
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function parse(value)
  local admitted, expiry, network = string.match(value, '^(%d+)|(%d+)|(%x+)$')
  return tonumber(admitted), tonumber(expiry), network
end
-- The pairs of an n-field without the one admitted at `drop` (0: none)
-- and without expired ones; returns the new text.
local function network_list(key, network, now, drop, add)
  local kept = {}
  local text = redis.call('HGET', key, 'n' .. network)
  if text then
    for a, e in string.gmatch(text, '(%d+):(%d+)') do
      if tonumber(e) > now and tonumber(a) ~= drop then kept[#kept + 1] = a .. ':' .. e end
    end
  end
  if add then kept[#kept + 1] = add end
  if #kept == 0 then
    redis.call('HDEL', key, 'n' .. network)
  else
    redis.call('HSET', key, 'n' .. network, table.concat(kept, ' '))
  end
end
-- The admissions of the last day, without one admitted at `drop` (0:
-- none), plus `add` (0: none).
local function day_list(key, now, drop, add)
  local kept = {}
  local text = redis.call('HGET', key, 'w')
  if text then
    for a in string.gmatch(text, '%d+') do
      local admitted = tonumber(a)
      if admitted > now - day and admitted ~= drop then kept[#kept + 1] = a end
    end
  end
  if add > 0 then kept[#kept + 1] = int(add) end
  if #kept == 0 then
    redis.call('HDEL', key, 'w')
  else
    redis.call('HSET', key, 'w', table.concat(kept, ' '))
  end
end
-- Drops every expired account entry and its network pair: a live entry
-- keeps the key alive, so the expired ones would otherwise stay forever.
local function prune(key, now)
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 1) == 'a' then
      local admitted, expiry, network = parse(all[i + 1])
      if expiry <= now then
        redis.call('HDEL', key, all[i])
        network_list(key, network, now, admitted, nil)
      end
    end
  end
end
local function extend_key(key, expiry)
  local latest = tonumber(redis.call('HGET', key, 'x')) or 0
  if expiry > latest then
    latest = expiry
    redis.call('HSET', key, 'x', int(latest))
  end
  if replay then return end
  if latest >= forever then
    redis.call('PERSIST', key)
  else
    redis.call('PEXPIREAT', key, latest)
  end
end
"""

# KEYS[1]: the identity's key. ARGV: 1 member (8 bytes), 2 limit (0:
# none), 3 lifetime ms (0: forever), 4 '1' to record even over the limit
# (shadow mode), 5 '1' to extend an account already counted (logins,
# rooms), 6 now ms (0: Redis time), 7 network, 8 '1' when the identity is
# rare (one person anywhere), 9 rotation window ms, 10 '1' when the network
# is a crowd, 11 crowd window ms, 12 the count on a crowded network at
# which to refuse, 13-16 the registrations in the last 10 minutes, hour,
# 6 hours and day at which to refuse (0: no check).
# Returns {allowed 1/0, already counted 1/0, the deciding scope's count
# before this call, expiry ms (0: none), scope (1 browser, 2 network,
# 3-6 velocity window), that scope's threshold, 1 if over a limit}.
EVALUATE = (
    _COMMON
    + """
local key, member = KEYS[1], ARGV[1]
local limit, life = tonumber(ARGV[2]), tonumber(ARGV[3])
local record_over, extend = ARGV[4] == '1', ARGV[5] == '1'
local now = now_of(ARGV[6])
local network, rare = ARGV[7], ARGV[8] == '1'
local rotation, crowd = tonumber(ARGV[9]), ARGV[10] == '1'
local crowd_window, crowd_threshold = tonumber(ARGV[11]), tonumber(ARGV[12])
local windows = {600000, 3600000, 21600000, 86400000}
local expiry = forever
if life > 0 then expiry = now + life end
local mine = 'a' .. member

local scope, count, threshold, over = 0, 0, 0, false
local function consider(s, c, t)
  if t <= 0 then return end
  if c >= t then
    if not over then scope, count, threshold, over = s, c, t, true end
  elseif not over and (threshold == 0 or c * threshold > count * t) then
    scope, count, threshold = s, c, t
  end
end
-- The accounts counted in the identity's scope for this network: all of
-- them for a rare identity, this network's for a popular one.
local function scope_count()
  if rare then
    local farmed = redis.call('HEXISTS', key, 'f') == 1
    local all = redis.call('HGETALL', key)
    local same = 0
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, 1) == 'a' then
        local admitted, e, n = parse(all[i + 1])
        if e > now and (farmed or n == network or now - admitted < rotation) then
          same = same + 1
        end
      end
    end
    return 1, same, limit
  end
  local here = 0
  local text = redis.call('HGET', key, 'n' .. network)
  if text then
    for a, e in string.gmatch(text, '(%d+):(%d+)') do
      if tonumber(e) > now and (not crowd or now - tonumber(a) < crowd_window) then
        here = here + 1
      end
    end
  end
  if crowd then return 2, here, crowd_threshold end
  return 2, here, limit
end

local old = redis.call('HGET', key, mine)
if old then
  local admitted, old_expiry, old_network = parse(old)
  if old_expiry > now then
    if extend and old_expiry < expiry then
      redis.call('HSET', key, mine, int(admitted) .. '|' .. int(expiry) .. '|' .. old_network)
      network_list(key, old_network, now, admitted, int(admitted) .. ':' .. int(expiry))
      extend_key(key, expiry)
    else
      expiry = old_expiry
    end
    local s, c, t = scope_count()
    return {1, 1, c, expiry, s, t, 0}
  end
  redis.call('HDEL', key, mine)
  network_list(key, old_network, now, admitted, nil)
end

consider(scope_count())
if over and scope == 1 then redis.call('HSET', key, 'f', '1') end

local velocity = false
for i = 1, 4 do
  if tonumber(ARGV[12 + i]) > 0 then velocity = true end
end
if velocity then
  local recent = {0, 0, 0, 0}
  local text = redis.call('HGET', key, 'w')
  if text then
    for a in string.gmatch(text, '%d+') do
      local age = now - tonumber(a)
      for i = 1, 4 do
        if age < windows[i] then recent[i] = recent[i] + 1 end
      end
    end
  end
  for i = 1, 4 do consider(2 + i, recent[i], tonumber(ARGV[12 + i])) end
end

if over and not record_over then
  return {0, 0, count, 0, scope, threshold, 1}
end
prune(key, now)
redis.call('HSET', key, mine, int(now) .. '|' .. int(expiry) .. '|' .. network)
network_list(key, network, now, 0, int(now) .. ':' .. int(expiry))
if velocity then day_list(key, now, 0, now) end
extend_key(key, expiry)
local flag = 0
if over then flag = 1 end
return {1, 0, count, expiry, scope, threshold, flag}
"""
)

# KEYS[1]: an identity's key. ARGV: 1 member. Removes the account's entry
# (a cancelled registration, a log-out, a room left). Returns 1 if there
# was one, else 0.
REMOVE = (
    _COMMON
    + """
local key, mine = KEYS[1], 'a' .. ARGV[1]
local old = redis.call('HGET', key, mine)
if not old then return 0 end
local now = now_of(0)
local admitted, expiry, network = parse(old)
redis.call('HDEL', key, mine)
network_list(key, network, now, admitted, nil)
if redis.call('HEXISTS', key, 'w') == 1 then day_list(key, now, admitted, 0) end
if expiry <= now then return 0 end
return 1
"""
)

# KEYS[1]: a login key. ARGV: 1 member, 2 lifetime ms. Returns the new
# expiry in ms, or 0 if the session is gone.
RENEW = (
    _COMMON
    + """
local key, mine = KEYS[1], 'a' .. ARGV[1]
local old = redis.call('HGET', key, mine)
if not old then return 0 end
local now = now_of(0)
local admitted, expiry, network = parse(old)
if expiry <= now then return 0 end
local renewed = now + tonumber(ARGV[2])
redis.call('HSET', key, mine, int(admitted) .. '|' .. int(renewed) .. '|' .. network)
network_list(key, network, now, admitted, int(admitted) .. ':' .. int(renewed))
extend_key(key, renewed)
return renewed
"""
)

# KEYS[1]: an identity's key. ARGV: 1 '1' to mark it farmed, 2 now ms (0:
# Redis time), then per entry: member, admitted ms, expiry ms, network.
# Restores still-valid entries (a rebuild after Redis lost its data, or a
# merge), never shortening one; returns how many were added.
RESTORE = (
    _COMMON
    + """
local key = KEYS[1]
local now = now_of(ARGV[2])
if ARGV[1] == '1' then redis.call('HSET', key, 'f', '1') end
local added = 0
for i = 3, #ARGV, 4 do
  local mine = 'a' .. ARGV[i]
  local admitted, expiry, network = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3]
  if expiry > now then
    local old = redis.call('HGET', key, mine)
    local old_expiry = 0
    if old then
      local _, e = parse(old)
      old_expiry = e
    end
    if old_expiry < expiry then
      redis.call('HSET', key, mine, int(admitted) .. '|' .. int(expiry) .. '|' .. network)
      if old then
        network_list(key, network, now, admitted, int(admitted) .. ':' .. int(expiry))
      else
        network_list(key, network, now, 0, int(admitted) .. ':' .. int(expiry))
        if now - admitted < day then day_list(key, now, 0, admitted) end
        added = added + 1
      end
      extend_key(key, expiry)
    end
  end
end
return added
"""
)
