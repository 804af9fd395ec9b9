-- Decide whether a call may pass a circuit breaker shared by every instance.
-- KEYS[1] breaker hash   KEYS[2] probe lease key
-- ARGV[1] cool-down in ms   ARGV[2] probe lease in ms   ARGV[3] probe token
-- Returns {verdict, state, ms until a call may pass}; verdict is 'allow',
-- 'probe' (this call is the single half-open trial) or 'reject'.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  return {'allow', 'closed', 0}
end
local opened_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
local reopen_at = opened_at + tonumber(ARGV[1])
if now_ms < reopen_at then
  return {'reject', 'open', reopen_at - now_ms}
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], 'state', 'half_open')
  return {'probe', 'half_open', 0}
end
local lease = redis.call('PTTL', KEYS[2])
return {'reject', 'half_open', math.max(lease, 1)}
