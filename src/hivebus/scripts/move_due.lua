-- Move retries that are due from a group's sorted set to its redo stream.
-- One script call is atomic, so several workers never move one retry twice.
-- A member that is not the JSON object hivebus writes is moved as it is, in
-- the event field, so that the consumer dead-letters it as undecodable
-- instead of this script failing on it at every call.
-- KEYS[1] retry sorted set   KEYS[2] redo stream
-- ARGV[1] maximum number of retries to move
-- Returns {moved, ms until the next retry is due or -1}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local ok, item = pcall(cjson.decode, member)
  if not ok or type(item) ~= 'table' or type(item['e']) ~= 'string' then
    item = {e = member, a = '1', ff = '0', src = ''}
  end
  redis.call('XADD', KEYS[2], '*', 'e', item['e'], 'a', tostring(item['a'] or '1'),
    'ff', tostring(item['ff'] or '0'), 'src', tostring(item['src'] or ''))
  redis.call('ZREM', KEYS[1], member)
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if next_due[2] then
  wait = math.max(0, tonumber(next_due[2]) - now_ms)
end
return {#due, wait}
