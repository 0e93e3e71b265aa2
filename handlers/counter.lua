-- counter: counts events per key.
--
-- Event:   KEY (the whole event, surrounding whitespace trimmed).
-- view:    {"KEY": count, ...}; an empty window gives {}.
-- view K:  the count of key K (K trimmed too), 0 if absent.
-- dump:    what view gives, then every count is reset.
-- Config:  none (null or {}).
-- Rejects: an event that is empty after trimming.
-- Memory:  one table entry per distinct key in the window; no cap of its own
--          beyond the bucket's memory limit.

local trim = bucketly.trim

local H = {}

function H.init(config)
  if config ~= nil and (type(config) ~= "table" or next(config) ~= nil) then
    error("counter: takes no config (expected null or {})", 0)
  end
  -- counts: key -> integer >= 1; a key is present only once counted.
  return { counts = {} }
end

function H.send(state, event)
  local key = trim(event)
  if key == "" then return false, "empty event (expected KEY)" end
  local counts = state.counts
  counts[key] = (counts[key] or 0) + 1
end

function H.view(state, arg)
  if arg == nil then return state.counts end
  return state.counts[trim(arg)] or 0
end

function H.dump(state)
  local counts = state.counts
  state.counts = {}
  return counts
end

return H
