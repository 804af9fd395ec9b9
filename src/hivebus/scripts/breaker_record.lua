-- Record the outcome of a call through a circuit breaker.
-- KEYS[1] breaker hash   KEYS[2] probe lease key
-- ARGV[1] 'success' or 'failure'   ARGV[2] failure threshold   ARGV[3] window ms
-- ARGV[4] probe token ('' when the call was not the probe)
-- ARGV[5] minimum calls in the window before the rate applies
-- ARGV[6] failure rate (0..1) that opens the breaker, or 0 to use the count only
-- Returns {state before, state after}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local before = redis.call('HGET', KEYS[1], 'state') or 'closed'
local is_probe = ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4]
if is_probe then
  redis.call('DEL', KEYS[2])
  if ARGV[1] == 'success' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'calls', 0,
      'window_start', now_ms, 'changed_at', now_ms)
    return {before, 'closed'}
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now_ms, 'changed_at', now_ms)
  return {before, 'open'}
end
if before ~= 'closed' then
  return {before, before}
end
local window_start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
if now_ms - window_start > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'window_start', now_ms, 'failures', 0, 'calls', 0)
end
local calls = redis.call('HINCRBY', KEYS[1], 'calls', 1)
if ARGV[1] == 'success' then
  return {before, 'closed'}
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local rate = tonumber(ARGV[6])
local trips = failures >= tonumber(ARGV[2])
if rate > 0 and calls >= tonumber(ARGV[5]) and failures / calls >= rate then
  trips = true
end
if trips then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now_ms, 'changed_at', now_ms)
  return {before, 'open'}
end
return {before, 'closed'}
