-- Create a context at version 1, unless one with that id exists.
-- KEYS[1] context hash   KEYS[2] key of its version 1
-- ARGV[1] version retention in ms   ARGV[2] n, the number of version fields
-- ARGV[3 .. 2+2n] version fields (name, value pairs): data, size, cause ...
-- ARGV[3+2n ..] fields kept only in the context hash: owner, tags ...
-- Returns the creation time in ms from the server clock, or 0 if the id is taken.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = 2 + 2 * tonumber(ARGV[2])
local version = {'version', '1', 'updated_ms', now_ms}
for i = 3, last do
  version[#version + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(version))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
for i = last + 1, #ARGV do
  version[#version + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], 'created_ms', now_ms, unpack(version))
return now_ms
