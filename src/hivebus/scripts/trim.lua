-- Trim a stream by age, never past the oldest entry that a group still has
-- pending, so that no unacknowledged entry is removed. Entries that a group
-- has not read yet are still trimmed once they are older than the retention,
-- unless ARGV[2] is '1': the script names those groups so the caller can warn.
-- KEYS[1] stream   ARGV[1] retention in ms
-- ARGV[2] '1' to keep every entry that a group has not read yet as well
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
local function first_unread(group)
  local after = '(' .. group['last-delivered-id']
  local row = redis.call('XRANGE', KEYS[1], after, '+', 'COUNT', 1)[1]
  return row and row[1]
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local floor_id = math.max(0, now_ms - tonumber(ARGV[1])) .. '-0'
local keep_unread = ARGV[2] == '1'
local groups = {}
for _, reply in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #reply, 2 do
    group[reply[i]] = reply[i + 1]
  end
  groups[#groups + 1] = group
end
for _, group in ipairs(groups) do
  local pending = redis.call('XPENDING', KEYS[1], group['name'])
  if pending[2] and older(pending[2], floor_id) then
    floor_id = pending[2]
  end
  local unread = keep_unread and first_unread(group)
  if unread and older(unread, floor_id) then
    floor_id = unread
  end
end
local lagging = {}
for _, group in ipairs(groups) do
  local unread = first_unread(group)
  if unread and older(unread, floor_id) then
    lagging[#lagging + 1] = group['name']
  end
end
local result = {redis.call('XTRIM', KEYS[1], 'MINID', floor_id)}
for _, name in ipairs(lagging) do
  result[#result + 1] = name
end
return result
