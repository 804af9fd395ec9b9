-- Add a dead letter and acknowledge the entry it replaces, atomically, and
-- remove dead letters older than the retention.
-- KEYS[1] dead-letter stream   KEYS[2] stream the entry came from (KEYS[1] if none)
-- ARGV[1] group   ARGV[2] entry id ('' if there is nothing to acknowledge)
-- ARGV[3] retention in ms   ARGV[4..] field, value pairs of the dead letter
-- Returns the dead letter's stream id.
--
-- The trim is exact (MINID without '~'): an approximate trim only drops whole
-- stream nodes of 100 entries, so a small queue would keep old entries forever.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local cutoff = math.max(0, now_ms - tonumber(ARGV[3]))
-- Failure times come from the server clock, so dead letters written by hosts
-- with skewed clocks still sort in the order they happened. A first failure
-- time of 0 means "this one".
local fields = {}
for i = 4, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == 'last_failure_ms' or (name == 'first_failure_ms' and value == '0') then
    value = tostring(now_ms)
  end
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('XTRIM', KEYS[1], 'MINID', cutoff .. '-0')
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
end
return id
