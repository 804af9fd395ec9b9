-- Schedule a failed entry for a later attempt and acknowledge it, atomically,
-- so the entry is never both pending and scheduled, nor neither.
-- KEYS[1] retry sorted set of the group   KEYS[2] stream the entry came from
-- ARGV[1] group   ARGV[2] entry id   ARGV[3] delay in ms   ARGV[4] member (JSON)
-- ARGV[5] '1' to delete the entry too. Only a redo-stream entry is deleted,
--         because only this group reads it. No settled retry is left there.
-- Returns the due time in ms, taken from the server clock.
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], due, ARGV[4])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if ARGV[5] == '1' then
  redis.call('XDEL', KEYS[2], ARGV[2])
end
return due
