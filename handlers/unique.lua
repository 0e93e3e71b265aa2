-- unique: counts distinct members per key.
--
-- Event:   KEY MEMBER, split at the first space after trimming the event; KEY
--          and MEMBER are trimmed, so "k   m" is key "k", member "m". MEMBER
--          may contain spaces ("k a b" is member "a b").
-- view:    {"KEY": distinct members, ...}; an empty window gives {}.
-- view K:  the number of distinct members of key K (K trimmed), 0 if absent.
-- dump:    what view gives, then every key and member is forgotten.
-- Config:  none (null or {}).
-- Rejects: an empty event, or one without a space ("expected KEY MEMBER").
-- Memory:  every distinct (KEY, MEMBER) pair of the window is kept, since the
--          count is exact; no cap of its own beyond the bucket's memory limit.

local byte, find, sub = string.byte, string.find, string.sub

-- s without leading/trailing whitespace (the bytes %s matches). Returns s itself,
-- without copying, when there is none: the common case costs two byte reads.
local function trim(s)
  local i, j = 1, #s
  while i <= j do
    local b = byte(s, i)
    if b ~= 32 and (b < 9 or b > 13) then break end
    i = i + 1
  end
  while j > i do
    local b = byte(s, j)
    if b ~= 32 and (b < 9 or b > 13) then break end
    j = j - 1
  end
  if i == 1 and j == #s then return s end
  return sub(s, i, j)
end

-- s in double quotes for a rejection reason, cut to at most 64 bytes (never
-- inside a UTF-8 sequence).
local function quote(s)
  if #s > 64 then
    local n = 64
    while n > 0 and (byte(s, n + 1) & 0xC0) == 0x80 do n = n - 1 end
    s = sub(s, 1, n) .. "..."
  end
  return '"' .. s .. '"'
end

local H = {}

function H.init(config)
  if config ~= nil and (type(config) ~= "table" or next(config) ~= nil) then
    error("unique: takes no config (expected null or {})", 0)
  end
  -- members[key] is the set of members seen for key (member -> true), and
  -- counts[key] its size, kept alongside so that view is O(keys). Both tables
  -- always have the same keys.
  return { members = {}, counts = {} }
end

function H.send(state, event)
  local s = trim(event)
  if s == "" then return false, "empty event (expected KEY MEMBER)" end
  local sp = find(s, " ", 1, true)
  if sp == nil then return false, "expected KEY MEMBER, got " .. quote(s) end
  -- s is trimmed, so its first and last bytes are not whitespace: 1 < sp < #s,
  -- and both parts are non-empty after trimming.
  local key, member = trim(sub(s, 1, sp - 1)), trim(sub(s, sp + 1))
  local set = state.members[key]
  if set == nil then
    set = {}
    state.members[key] = set
    state.counts[key] = 0
  end
  if not set[member] then
    set[member] = true
    state.counts[key] = state.counts[key] + 1
  end
end

function H.view(state, arg)
  if arg == nil then return state.counts end
  return state.counts[trim(arg)] or 0
end

function H.dump(state)
  local counts = state.counts
  state.members, state.counts = {}, {}
  return counts
end

return H
