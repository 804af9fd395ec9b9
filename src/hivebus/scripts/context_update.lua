-- Compare-and-set update of a context: write version N+1 only if it is at N.
-- KEYS[1] context hash   KEYS[2] key of version N+1
-- ARGV[1] N, the version the update was made from   ARGV[2] retention in ms
-- ARGV[3 ..] version fields (name, value pairs): data, size, updated_by ...
-- Returns {1, N+1, time in ms} on success, {0, current version, 0} when the
-- context is at another version, and {-1, 0, 0} when it does not exist.
local current = redis.call('HGET', KEYS[1], 'version')
if not current then
  return {-1, 0, 0}
end
current = tonumber(current)
if current ~= tonumber(ARGV[1]) then
  return {0, current, 0}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local fields = {'version', current + 1, 'updated_ms', now_ms}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {1, current + 1, now_ms}
