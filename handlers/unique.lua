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

local trim, split, quote = bucketly.trim, bucketly.split, bucketly.quote

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
  local key, member = split(event)
  if key == nil then
    local s = trim(event)
    if s == "" then return false, "empty event (expected KEY MEMBER)" end
    return false, "expected KEY MEMBER, got " .. quote(s)
  end
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
