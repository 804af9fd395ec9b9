-- Decide whether a call may pass a circuit breaker shared by every instance.
-- KEYS[1] breaker hash   KEYS[2] probe lease key
-- ARGV[1] cool-down in ms   ARGV[2] probe lease in ms
-- ARGV[3] probe token, or '' to look without taking the lease
-- Returns {verdict, state, ms until a call may pass, state before the call}.
-- The verdict is 'allow' (closed), 'probe' (this call is the one half-open
-- trial, or with an empty token: a trial could start now) or 'reject'.
-- The lease is taken inside this script only when no lease exists, so at
-- most one caller across every instance holds it. It expires after ARGV[2]
-- ms, so a probe whose process died does not keep the breaker half-open.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  return {'allow', 'closed', 0, 'closed'}
end
local opened_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
local reopen_at = opened_at + tonumber(ARGV[1])
if now_ms < reopen_at then
  return {'reject', state, reopen_at - now_ms, state}
end
local lease = redis.call('PTTL', KEYS[2])
if lease > 0 then
  return {'reject', 'half_open', lease, state}
end
if ARGV[3] == '' then
  return {'probe', state, 0, state}
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'state', 'half_open', 'changed_at', now_ms)
return {'probe', 'half_open', 0, state}
