-- Record the outcome of a call through a circuit breaker.
-- KEYS[1] breaker hash   KEYS[2] probe lease key
-- ARGV[1] 'success' or 'failure'   ARGV[2] failures that open the breaker
-- ARGV[3] window in ms   ARGV[4] probe token ('' when the call was no probe)
-- ARGV[5] calls in the window before the failure rate applies
-- ARGV[6] failure rate (0..1) that opens the breaker, or 0 to use the count only
-- ARGV[7] buckets per window
-- Returns {state before, state after, failures in window, calls in window}.
--
-- Outcomes are counted in a sliding window of ARGV[7] buckets, each a hash
-- field 'b<N>' holding 'slot:calls:failures', where slot is the bucket's
-- number since the epoch. The window therefore covers between
-- (buckets - 1) / buckets of ARGV[3] and all of it.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local before = redis.call('HGET', KEYS[1], 'state') or 'closed'
local buckets = tonumber(ARGV[7])
local bucket_ms = math.max(1, math.floor(tonumber(ARGV[3]) / buckets))
local slot = math.floor(now_ms / bucket_ms)

local function clear_buckets()
  for i = 0, buckets - 1 do
    redis.call('HDEL', KEYS[1], 'b' .. i)
  end
end

local function parse(value)
  if not value then
    return -1, 0, 0
  end
  local s, c, f = string.match(value, '^(%d+):(%d+):(%d+)$')
  return tonumber(s), tonumber(c), tonumber(f)
end

local is_probe = ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4]
if is_probe then
  redis.call('DEL', KEYS[2])
  if ARGV[1] == 'success' then
    clear_buckets()
    redis.call('HSET', KEYS[1], 'state', 'closed', 'changed_at', now_ms)
    return {before, 'closed', 0, 0}
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now_ms, 'changed_at', now_ms)
  return {before, 'open', 0, 0}
end
-- A probe whose lease ran out (another probe took over), or a call admitted
-- before the breaker opened: its outcome is stale, and the current probe
-- decides.
if ARGV[4] ~= '' or before ~= 'closed' then
  return {before, before, 0, 0}
end

local field = 'b' .. (slot % buckets)
local s, c, f = parse(redis.call('HGET', KEYS[1], field))
if s ~= slot then
  c, f = 0, 0
end
c = c + 1
if ARGV[1] == 'failure' then
  f = f + 1
end
-- The window's size is stored too, so that a reader without this caller's
-- config (a dashboard) adds up the buckets the same way.
redis.call('HSET', KEYS[1], field, slot .. ':' .. c .. ':' .. f,
  'window_ms', ARGV[3], 'buckets', buckets)

local calls, failures = 0, 0
for i = 0, buckets - 1 do
  local bs, bc, bf = parse(redis.call('HGET', KEYS[1], 'b' .. i))
  if bs > slot - buckets then
    calls = calls + bc
    failures = failures + bf
  end
end
if ARGV[1] == 'success' then
  return {before, 'closed', failures, calls}
end
local rate = tonumber(ARGV[6])
local trips = failures >= tonumber(ARGV[2])
if rate > 0 and calls >= tonumber(ARGV[5]) and failures / calls >= rate then
  trips = true
end
if trips then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now_ms, 'changed_at', now_ms)
  return {before, 'open', failures, calls}
end
return {before, 'closed', failures, calls}
