"""The guard's Lua scripts, as named constants. Each runs atomically in one
round trip, so a check and its record can never be split by another call.

Identities share bucket hashes, one per (service, bucket, action)
(guard/keys.py): a small hash key costs Redis about 230 bytes of its own,
more than the entries it would hold. Each identity (and room) is one field
of its bucket's hash, its value one packed record:

- 1 byte: 'f' once the identity was refused as one browser (it is being
  farmed, and from then on every network counts for it), else '-';
- 6 bytes: the record's expiry, ms: the latest expiry any of its accounts
  ever had (as a key's own expiry would be);
- 3 bytes: how many accounts follow;
- per counted account, 28 bytes: its member (the account digest's 8
  bytes), when it was admitted (6), its expiry (6), its network (8);
- the rest: when the registrations of the last day were admitted, 6 bytes
  each (the velocity windows).

Numbers are big-endian; expiry 2^48-1 in a record means never
(9007199254740991 to callers). A shared hash cannot expire per identity,
so the scripts remove expired data themselves: a record drops its expired
accounts whenever it is written, a record past its expiry goes when it is
touched, and every call that records an entry also looks at SWEEP random
fields of its bucket and deletes those past their expiry (identities never
seen again go too). The key's own expiry is the latest of its records', so
a bucket whose identities all went quiet goes as a whole.

An identity with more than SPILL live accounts spills into keys of its own
(KEYS[2-4], keys.spills; the helpers below describe them) so a call never
reads all its accounts; its field then holds only a marker. A script
passed only KEYS[1] answers SPILLED (-1) when it needs them.

Time is the caller's (a backtest replays history) or, when the caller
passes 0, Redis's own (TIME), so every server agrees on it.
"""

from __future__ import annotations

# Random fields of the bucket looked at by each call that records: with
# at most one record added per such call, at most about 1/SWEEP of a busy
# bucket's records can be dead at any time.
SWEEP = 4
HEAD = 10
ENTRY = 28

# More live accounts than this and an identity's record spills into keys
# of its own (keys.spills; docs/guard.md says why 64).
SPILL = 64

# The record's helpers (bench/guard.py fills records with them too).
COMMON = (
    f"local SPILL = {SPILL}\n"
    + """
local forever = 9007199254740991
local never = 281474976710655
local day = 86400000
local HEAD, ENTRY = 10, 28
-- A spilled identity's own keys (keys.spills), in its bucket's slot.
local spill, expiries, admissions = KEYS[2], KEYS[3], KEYS[4]
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
local function put6(x)
  if x >= forever then x = never end
  local b6 = x % 256
  x = (x - b6) / 256
  local b5 = x % 256
  x = (x - b5) / 256
  local b4 = x % 256
  x = (x - b4) / 256
  local b3 = x % 256
  x = (x - b3) / 256
  local b2 = x % 256
  return string.char((x - b2) / 256, b2, b3, b4, b5, b6)
end
local function get6(s, at)
  local b1, b2, b3, b4, b5, b6 = string.byte(s, at, at + 5)
  local x = ((((b1 * 256 + b2) * 256 + b3) * 256 + b4) * 256 + b5) * 256 + b6
  if x == never then return forever end
  return x
end
local function put3(x)
  local b3 = x % 256
  x = (x - b3) / 256
  local b2 = x % 256
  return string.char((x - b2) / 256, b2, b3)
end
-- A record as tables: members, admitted, expiries, networks (one item per
-- account), the day's registration times, the farmed flag, its expiry.
local function load(text)
  local r = {m = {}, a = {}, e = {}, n = {}, w = {}, farmed = false, x = 0}
  if not text then return r end
  r.farmed = string.byte(text, 1) == 102 or string.byte(text, 1) == 70
  r.spilled = string.byte(text, 1) == 43 or string.byte(text, 1) == 70
  r.x = get6(text, 2)
  local b1, b2, b3 = string.byte(text, 8, 10)
  local count = (b1 * 256 + b2) * 256 + b3
  local at = HEAD + 1
  for i = 1, count do
    r.m[i] = string.sub(text, at, at + 7)
    r.a[i] = get6(text, at + 8)
    r.e[i] = get6(text, at + 14)
    r.n[i] = string.sub(text, at + 20, at + 27)
    at = at + ENTRY
  end
  local i = 0
  while at + 5 <= #text do
    i = i + 1
    r.w[i] = get6(text, at)
    at = at + 6
  end
  return r
end
local function find(r, member)
  for i = 1, #r.m do
    if r.m[i] == member then return i end
  end
  return nil
end
local function add(r, member, admitted, expiry, network)
  local i = #r.m + 1
  r.m[i], r.a[i], r.e[i], r.n[i] = member, admitted, expiry, network
end
local function drop(r, i)
  table.remove(r.m, i)
  table.remove(r.a, i)
  table.remove(r.e, i)
  table.remove(r.n, i)
end
-- The key lives as long as its latest record: never shortened, as other
-- identities' records may need it. `ttl`: its PTTL before this call wrote.
local function extend_key(key, ttl, expiry, now)
  if replay or expiry <= 0 or ttl == -1 then return end
  if ttl >= 0 and now + ttl >= expiry then return end
  if expiry >= forever then
    redis.call('PERSIST', key)
  else
    redis.call('PEXPIREAT', key, expiry)
  end
end
-- A spilled identity (more than SPILL live accounts): its field in the
-- bucket holds only a marker ('+', or 'F' once farmed; its expiry; no
-- accounts) and its accounts are in keys of its own, so a call reads only
-- what it needs: `spill`, a hash of the account's member -> admitted (6),
-- expiry (6), network (8); 'n' .. network -> its live accounts; 'a' -> all
-- live accounts; 'w' -> the day's registration times (6 bytes each);
-- `expiries`, the members by expiry (to drop expired ones, each once);
-- `admissions`, member .. network by admission (the time windows).
local function is_spilled(text)
  local b = string.byte(text, 1)
  return b == 43 or b == 70
end
local function marker(farmed, x)
  if farmed then return 'F' .. put6(x) .. put3(0) end
  return '+' .. put6(x) .. put3(0)
end
-- Every spill key lives exactly as long as the identity's latest account
-- (`x` only grows; nothing else shares them), even one a write just
-- created anew.
local function extend_spill(x, now)
  if replay then return end
  for _, k in ipairs({spill, expiries, admissions}) do
    if x >= forever then
      redis.call('PERSIST', k)
    else
      redis.call('PEXPIREAT', k, x)
    end
  end
end
-- Drops the accounts expired by `now` (each account once, when it expires:
-- the cost is spread over the calls, not paid per call).
local function prune_spill(now)
  local dead = redis.call('ZRANGEBYSCORE', expiries, '-inf', int(now))
  if #dead == 0 then return end
  for _, m in ipairs(dead) do
    local v = redis.call('HGET', spill, m)
    if v then
      local net = string.sub(v, 13, 20)
      if redis.call('HINCRBY', spill, 'n' .. net, -1) <= 0 then
        redis.call('HDEL', spill, 'n' .. net)
      end
      redis.call('HINCRBY', spill, 'a', -1)
      redis.call('HDEL', spill, m)
      redis.call('ZREM', admissions, m .. net)
    end
  end
  redis.call('ZREMRANGEBYSCORE', expiries, '-inf', int(now))
end
-- Counts a new account (not in the spill yet).
local function spill_add(member, admitted, expiry, network)
  redis.call('HSET', spill, member, put6(admitted) .. put6(expiry) .. network)
  redis.call('HINCRBY', spill, 'n' .. network, 1)
  redis.call('HINCRBY', spill, 'a', 1)
  redis.call('ZADD', expiries, int(expiry), member)
  redis.call('ZADD', admissions, int(admitted), member .. network)
end
-- Removes a counted account whose stored value is `v`.
local function spill_drop(member, v)
  local net = string.sub(v, 13, 20)
  if redis.call('HINCRBY', spill, 'n' .. net, -1) <= 0 then
    redis.call('HDEL', spill, 'n' .. net)
  end
  redis.call('HINCRBY', spill, 'a', -1)
  redis.call('HDEL', spill, member)
  redis.call('ZREM', expiries, member)
  redis.call('ZREM', admissions, member .. net)
end
local function spill_expiry(member, v, expiry)
  redis.call('HSET', spill, member, string.sub(v, 1, 6) .. put6(expiry) .. string.sub(v, 13, 20))
  redis.call('ZADD', expiries, int(expiry), member)
end
-- The day's registration times, as a string of 6-byte times, without those
-- older than a day.
local function spill_times(now)
  local text = redis.call('HGET', spill, 'w')
  if not text then return '' end
  local parts = {}
  for at = 1, #text - 5, 6 do
    if get6(text, at) > now - day then parts[#parts + 1] = string.sub(text, at, at + 5) end
  end
  return table.concat(parts)
end
-- Writes a record (load()'s tables) as a spilled one: its live accounts and
-- the day's registration times. Returns its expiry.
local function spill_all(key, field, r, now)
  redis.call('DEL', spill, expiries, admissions)
  for i = 1, #r.m do
    if r.e[i] > now then
      spill_add(r.m[i], r.a[i], r.e[i], r.n[i])
      if r.e[i] > r.x then r.x = r.e[i] end
    end
  end
  local times = {}
  for i = 1, #r.w do
    if r.w[i] > now - day then times[#times + 1] = put6(r.w[i]) end
  end
  if #times > 0 then redis.call('HSET', spill, 'w', table.concat(times)) end
  redis.call('HSET', key, field, marker(r.farmed, r.x))
  extend_spill(r.x, now)
  return r.x
end
-- Writes the record back without its expired accounts and without
-- registration times older than a day; a record past its expiry goes.
-- Returns the record's expiry (0: gone).
local function save(key, field, r, now)
  local parts = {}
  local kept = 0
  for i = 1, #r.m do
    local e = r.e[i]
    if e > now then
      kept = kept + 1
      parts[#parts + 1] = r.m[i] .. put6(r.a[i]) .. put6(e) .. r.n[i]
      if e > r.x then r.x = e end
    end
  end
  for i = 1, #r.w do
    if r.w[i] > now - day then parts[#parts + 1] = put6(r.w[i]) end
  end
  if r.x <= now then
    redis.call('HDEL', key, field)
    return 0
  end
  if kept > SPILL then return spill_all(key, field, r, now) end
  local flag = '-'
  if r.farmed then flag = 'f' end
  redis.call('HSET', key, field, flag .. put6(r.x) .. put3(kept) .. table.concat(parts))
  return r.x
end
-- A few random records of the bucket: those past their expiry go.
local function sweep(key, field, now, count)
  local got = redis.call('HRANDFIELD', key, count, 'WITHVALUES')
  if type(got) ~= 'table' then return end
  for i = 1, #got, 2 do
    local name, value = got[i], got[i + 1]
    if name ~= field and #value >= HEAD and get6(value, 2) <= now then
      redis.call('HDEL', key, name)
    end
  end
end
"""
)

# KEYS[1]: the identity's bucket. ARGV: 1 the identity's field, 2 member
# (8 bytes), 3 limit (0: none), 4 lifetime ms (0: forever), 5 '1' to
# record even over the limit (shadow mode), 6 '1' to extend an account
# already counted (logins, rooms), 7 now ms (0: Redis time), 8 network (8
# bytes), 9 '1' when the identity is rare (one person anywhere), '2' when
# rare but its fingerprint one strangers share (a farmed mark does not make
# every network count), '0' when popular, 10
# rotation window ms, 11 '1' when the network is a crowd, 12 crowd window
# ms, 13 the count on a crowded network at which to refuse, 14-17 the
# registrations in the last 10 minutes, hour, 6 hours and day at which to
# refuse (0: no check), 18 the registrations in the last 10 minutes from
# which a farmed identity is in its burst, when its accounts from every
# network count (0 or absent: never).
# Returns {allowed 1/0, already counted 1/0, the deciding scope's count
# before this call, expiry ms (0: none), scope (1 browser, 2 network,
# 3-6 velocity window, 7 every network in a farmed identity's burst),
# that scope's threshold, 1 if over a limit}.
EVALUATE = (
    COMMON
    + f"local SWEEP = {SWEEP}\n"
    + """
local key, field, member = KEYS[1], ARGV[1], ARGV[2]
local limit, life = tonumber(ARGV[3]), tonumber(ARGV[4])
local record_over, extend = ARGV[5] == '1', ARGV[6] == '1'
local now = now_of(ARGV[7])
local network, rare, shared = ARGV[8], ARGV[9] ~= '0', ARGV[9] == '2'
local rotation, crowd = tonumber(ARGV[10]), ARGV[11] == '1'
local crowd_window, crowd_threshold = tonumber(ARGV[12]), tonumber(ARGV[13])
local windows = {600000, 3600000, 21600000, 86400000}
local expiry = forever
if life > 0 then expiry = now + life end

-- The record is read in place (string.find and byte offsets, no tables)
-- until it must be rewritten: a popular identity's record holds many
-- accounts, and a returning one needs only its own and its network's.
local text = redis.call('HGET', key, field)
if text and get6(text, 2) <= now then text = false end

local scope, count, threshold, over = 0, 0, 0, false
local function consider(s, c, t)
  if t <= 0 then return end
  if c >= t then
    if not over then scope, count, threshold, over = s, c, t, true end
  elseif not over and (threshold == 0 or c * threshold > count * t) then
    scope, count, threshold = s, c, t
  end
end
local burst = tonumber(ARGV[18]) or 0
local velocity = burst > 0
for i = 1, 4 do
  if tonumber(ARGV[13 + i]) > 0 then velocity = true end
end
-- The velocity windows' counts of the day's registration times (6 bytes
-- each in `times` from `from`); returns whether a farmed identity is in
-- its burst (`burst` registrations within the shortest window), when every
-- network's accounts count.
local function consider_velocity(times, from, farmed)
  local recent = {0, 0, 0, 0}
  for at = from, #times - 5, 6 do
    local age = now - get6(times, at)
    for i = 1, 4 do
      if age < windows[i] then recent[i] = recent[i] + 1 end
    end
  end
  for i = 1, 4 do consider(2 + i, recent[i], tonumber(ARGV[13 + i])) end
  return farmed and burst > 0 and recent[1] >= burst
end

if text and is_spilled(text) then
  if not spill then return {-1} end
  -- A spilled identity: its own account's field, its network's count and
  -- the accounts admitted within a window (crowds, rotation) are read,
  -- never all its accounts.
  prune_spill(now)
  local farmed = string.byte(text, 1) == 70
  local function recent_on(window, same_network)
    local got = redis.call('ZRANGEBYSCORE', admissions, '(' .. int(now - window), '+inf')
    local c = 0
    for _, s in ipairs(got) do
      if (string.sub(s, 9, 16) == network) == same_network then c = c + 1 end
    end
    return c
  end
  local function spilled_count()
    if rare then
      if farmed and not shared then
        return 1, tonumber(redis.call('HGET', spill, 'a')) or 0, limit
      end
      local same = tonumber(redis.call('HGET', spill, 'n' .. network)) or 0
      if rotation > 0 then same = same + recent_on(rotation, false) end
      return 1, same, limit
    end
    if crowd then return 2, recent_on(crowd_window, true), crowd_threshold end
    return 2, tonumber(redis.call('HGET', spill, 'n' .. network)) or 0, limit
  end
  local x = get6(text, 2)
  local v = redis.call('HGET', spill, member)
  if v then
    local old_expiry = get6(v, 7)
    if extend and old_expiry < expiry then
      spill_expiry(member, v, expiry)
      if expiry > x then
        local ttl = redis.call('PTTL', key)
        redis.call('HSET', key, field, marker(farmed, expiry))
        extend_key(key, ttl, expiry, now)
        extend_spill(expiry, now)
      end
    else
      expiry = old_expiry
    end
    local s, c, t = spilled_count()
    return {1, 1, c, expiry, s, t, 0}
  end
  consider(spilled_count())
  local times = ''
  if velocity then
    times = spill_times(now)
    if consider_velocity(times, 1, farmed) then
      consider(7, tonumber(redis.call('HGET', spill, 'a')) or 0, limit)
    end
  end
  if over and scope == 1 then farmed = true end
  if over and not record_over then
    if farmed and string.byte(text, 1) ~= 70 then
      redis.call('HSET', key, field, marker(true, x))
    end
    return {0, 0, count, 0, scope, threshold, 1}
  end
  spill_add(member, now, expiry, network)
  if velocity then redis.call('HSET', spill, 'w', times .. put6(now)) end
  if expiry > x then x = expiry end
  local ttl = redis.call('PTTL', key)
  redis.call('HSET', key, field, marker(farmed, x))
  extend_key(key, ttl, x, now)
  extend_spill(x, now)
  sweep(key, field, now, SWEEP)
  local flag = 0
  if over then flag = 1 end
  return {1, 0, count, expiry, scope, threshold, flag}
end
local n, last = 0, HEAD
if text then
  local b1, b2, b3 = string.byte(text, 8, 10)
  n = (b1 * 256 + b2) * 256 + b3
  last = HEAD + n * ENTRY
end
-- The offset of the entry whose bytes at `shift` are `value`, from `from`.
local function seek(value, shift, from)
  while text do
    local at = string.find(text, value, from + shift, true)
    if not at or at + 7 > last then return nil end
    if (at - shift - HEAD - 1) % ENTRY == 0 then return at - shift end
    from = at - shift + 1
  end
  return nil
end

-- The accounts counted in the identity's scope for this network: all of
-- them for a rare identity, this network's for a popular one.
local function scope_count()
  local same = 0
  if rare then
    local farmed = not shared and text and string.byte(text, 1) == 102
    for at = HEAD + 1, last, ENTRY do
      if get6(text, at + 14) > now and (farmed or string.sub(text, at + 20, at + 27) == network
          or now - get6(text, at + 8) < rotation) then
        same = same + 1
      end
    end
    return 1, same, limit
  end
  local at = seek(network, 20, HEAD + 1)
  while at do
    if get6(text, at + 14) > now and (not crowd or now - get6(text, at + 8) < crowd_window) then
      same = same + 1
    end
    at = seek(network, 20, at + ENTRY)
  end
  if crowd then return 2, same, crowd_threshold end
  return 2, same, limit
end

local mine = seek(member, 0, HEAD + 1)
if mine and get6(text, mine + 14) > now then
  local old_expiry = get6(text, mine + 14)
  if extend and old_expiry < expiry then
    -- Only this entry's expiry and the record's change: rewritten in place.
    local x = get6(text, 2)
    if expiry > x then x = expiry end
    local ttl = redis.call('PTTL', key)
    redis.call('HSET', key, field, string.sub(text, 1, 1) .. put6(x)
      .. string.sub(text, 8, mine + 13) .. put6(expiry) .. string.sub(text, mine + 20))
    extend_key(key, ttl, x, now)
  else
    expiry = old_expiry
  end
  local s, c, t = scope_count()
  return {1, 1, c, expiry, s, t, 0}
end

consider(scope_count())
local farmed_now = over and scope == 1 and text and string.byte(text, 1) ~= 102

if velocity and text and consider_velocity(text, last + 1, string.byte(text, 1) == 102) then
  local all = 0
  for at = HEAD + 1, last, ENTRY do
    if get6(text, at + 14) > now then all = all + 1 end
  end
  consider(7, all, limit)
end

if over and not record_over then
  if farmed_now then redis.call('HSET', key, field, 'f' .. string.sub(text, 2)) end
  return {0, 0, count, 0, scope, threshold, 1}
end
-- The record again, without its expired accounts (this one's old entry
-- among them) and registration times older than a day, plus this entry:
-- whole entries are copied as they are, none decoded.
local parts, kept, x, flag = {}, 1, expiry, '-'
if text then
  for at = HEAD + 1, last, ENTRY do
    if get6(text, at + 14) > now then
      kept = kept + 1
      parts[#parts + 1] = string.sub(text, at, at + ENTRY - 1)
    end
  end
  if get6(text, 2) > x then x = get6(text, 2) end
  if string.byte(text, 1) == 102 then flag = 'f' end
end
if over and scope == 1 then flag = 'f' end
parts[#parts + 1] = member .. put6(now) .. put6(expiry) .. network
if text then
  for at = last + 1, #text - 5, 6 do
    if get6(text, at) > now - day then parts[#parts + 1] = string.sub(text, at, at + 5) end
  end
end
if velocity then parts[#parts + 1] = put6(now) end
if kept > SPILL and not spill then return {-1} end
local ttl = redis.call('PTTL', key)
local record = flag .. put6(x) .. put3(kept) .. table.concat(parts)
if kept > SPILL then
  -- Past SPILL accounts the record moves to keys of its own (once).
  spill_all(key, field, load(record), now)
else
  redis.call('HSET', key, field, record)
end
extend_key(key, ttl, x, now)
sweep(key, field, now, SWEEP)
local flag = 0
if over then flag = 1 end
return {1, 0, count, expiry, scope, threshold, flag}
"""
)

# KEYS[1]: an identity's bucket. ARGV: 1 the identity's field, 2 member.
# Removes the account's entry (a cancelled registration, a log-out, a room
# left) and its registration time. Returns 1 if there was a live one, else 0.
REMOVE = (
    COMMON
    + """
local key, field, member = KEYS[1], ARGV[1], ARGV[2]
local text = redis.call('HGET', key, field)
if not text then return 0 end
local now = now_of(0)
if is_spilled(text) then
  if get6(text, 2) <= now then return 0 end
  if not spill then return -1 end
  prune_spill(now)
  local v = redis.call('HGET', spill, member)
  if not v then return 0 end
  spill_drop(member, v)
  local times = spill_times(now)
  local admitted = string.sub(v, 1, 6)
  for at = 1, #times - 5, 6 do
    if string.sub(times, at, at + 5) == admitted then
      redis.call('HSET', spill, 'w', string.sub(times, 1, at - 1) .. string.sub(times, at + 6))
      break
    end
  end
  return 1
end
local r = load(text)
local i = find(r, member)
if not i then return 0 end
local admitted, expiry = r.a[i], r.e[i]
drop(r, i)
for j = 1, #r.w do
  if r.w[j] == admitted then
    table.remove(r.w, j)
    break
  end
end
save(key, field, r, now)
if expiry <= now then return 0 end
return 1
"""
)

# KEYS[1]: a login bucket. ARGV: 1 the identity's field, 2 member, 3
# lifetime ms. Returns the new expiry in ms, or 0 if the session is gone.
RENEW = (
    COMMON
    + """
local key, field, member = KEYS[1], ARGV[1], ARGV[2]
local text = redis.call('HGET', key, field)
if not text then return 0 end
local now = now_of(0)
if is_spilled(text) then
  if get6(text, 2) <= now then return 0 end
  if not spill then return -1 end
  prune_spill(now)
  local v = redis.call('HGET', spill, member)
  if not v then return 0 end
  local renewed = now + tonumber(ARGV[3])
  spill_expiry(member, v, renewed)
  if renewed > get6(text, 2) then
    local ttl = redis.call('PTTL', key)
    redis.call('HSET', key, field, marker(string.byte(text, 1) == 70, renewed))
    extend_key(key, ttl, renewed, now)
    extend_spill(renewed, now)
  end
  return renewed
end
local r = load(text)
local i = find(r, member)
if not i then return 0 end
if r.e[i] <= now then return 0 end
local renewed = now + tonumber(ARGV[3])
r.e[i] = renewed
local ttl = redis.call('PTTL', key)
extend_key(key, ttl, save(key, field, r, now), now)
return renewed
"""
)

# KEYS[1]: an identity's bucket. ARGV: 1 the identity's field, 2 '1' to
# mark it farmed, 3 now ms (0: Redis time), 4 '1' to keep the day's
# registration times (registrations), then per entry: member, admitted ms,
# expiry ms, network (8 bytes). Restores still-valid entries (a rebuild
# after Redis lost its data, or a merge), never shortening one; returns how
# many were added.
RESTORE = (
    COMMON
    + """
local key, field = KEYS[1], ARGV[1]
local now = now_of(ARGV[3])
local times = ARGV[4] == '1'
local r = load(redis.call('HGET', key, field))
if r.x <= now then r = load(nil) end
if r.spilled and not spill then return -1 end
if r.spilled then
  -- Entry by entry into the spilled identity's own keys.
  prune_spill(now)
  local added, x, farmed = 0, r.x, r.farmed or ARGV[2] == '1'
  local w = spill_times(now)
  for i = 5, #ARGV, 4 do
    local member = ARGV[i]
    local admitted, expiry, network = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3]
    if expiry > now then
      local v = redis.call('HGET', spill, member)
      if not v then
        spill_add(member, admitted, expiry, network)
        if times and now - admitted < day then w = w .. put6(admitted) end
        added = added + 1
      elseif get6(v, 7) < expiry then
        spill_drop(member, v)
        spill_add(member, admitted, expiry, network)
      end
      if expiry > x then x = expiry end
    end
  end
  if #w > 0 then redis.call('HSET', spill, 'w', w) end
  local ttl = redis.call('PTTL', key)
  redis.call('HSET', key, field, marker(farmed, x))
  extend_key(key, ttl, x, now)
  extend_spill(x, now)
  return added
end
local changed = false
if ARGV[2] == '1' and not r.farmed then
  r.farmed = true
  changed = true
end
local added = 0
for i = 5, #ARGV, 4 do
  local member = ARGV[i]
  local admitted, expiry, network = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3]
  if expiry > now then
    local j = find(r, member)
    if j and r.e[j] <= now then
      drop(r, j)
      j = nil
    end
    if not j then
      add(r, member, admitted, expiry, network)
      if times and now - admitted < day then r.w[#r.w + 1] = admitted end
      added = added + 1
      changed = true
    elseif r.e[j] < expiry then
      r.a[j], r.e[j], r.n[j] = admitted, expiry, network
      changed = true
    end
  end
end
if changed then
  if not spill then
    local live = 0
    for i = 1, #r.e do
      if r.e[i] > now then live = live + 1 end
    end
    if live > SPILL then return -1 end
  end
  local ttl = redis.call('PTTL', key)
  extend_key(key, ttl, save(key, field, r, now), now)
end
return added
"""
)
