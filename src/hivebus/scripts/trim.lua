-- Trim a stream by age, never past the oldest entry that a group still has
-- pending, so that no unacknowledged entry is removed. Entries that a group
-- has not read yet are still trimmed once they are older than the retention:
-- the script names those groups so the caller can warn.
-- KEYS[1] stream   ARGV[1] retention in ms
-- Returns {entries removed, group names that lost unread entries...}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local a_ms, a_seq = parse(a)
  local b_ms, b_seq = parse(b)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local floor_id = math.max(0, now_ms - tonumber(ARGV[1])) .. '-0'
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local lagging = {}
for _, group in ipairs(groups) do
  local fields = {}
  for i = 1, #group, 2 do
    fields[group[i]] = group[i + 1]
  end
  local pending = redis.call('XPENDING', KEYS[1], fields['name'])
  if pending[2] and older(pending[2], floor_id) then
    floor_id = pending[2]
  end
end
for _, group in ipairs(groups) do
  local fields = {}
  for i = 1, #group, 2 do
    fields[group[i]] = group[i + 1]
  end
  local unread = redis.call('XRANGE', KEYS[1], '(' .. fields['last-delivered-id'], '+',
    'COUNT', 1)[1]
  if unread and older(unread[1], floor_id) then
    lagging[#lagging + 1] = fields['name']
  end
end
local result = {redis.call('XTRIM', KEYS[1], 'MINID', floor_id)}
for _, name in ipairs(lagging) do
  result[#result + 1] = name
end
return result
