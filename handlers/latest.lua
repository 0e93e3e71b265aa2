-- latest: keeps the last value sent for each key.
--
-- Event:   KEY VALUE, split at the first space after trimming the event; KEY
--          and VALUE are trimmed, so "k   v" is key "k", value "v". VALUE may
--          contain spaces ("k a b" is value "a b").
-- view:    {"KEY": "last value", ...}; an empty window gives {}.
-- view K:  the last value of key K (K trimmed), null if absent.
-- dump:    what view gives, then every key is forgotten.
-- Config:  none (null or {}).
-- Rejects: an empty event, or one without a space ("expected KEY VALUE").
-- Memory:  one entry per distinct key in the window; no cap of its own beyond
--          the bucket's memory limit.

local trim, split, quote = bucketly.trim, bucketly.split, bucketly.quote

local H = {}

function H.init(config)
  if config ~= nil and (type(config) ~= "table" or next(config) ~= nil) then
    error("latest: takes no config (expected null or {})", 0)
  end
  -- values: key -> last value (a non-empty string).
  return { values = {} }
end

function H.send(state, event)
  local key, value = split(event)
  if key == nil then
    local s = trim(event)
    if s == "" then return false, "empty event (expected KEY VALUE)" end
    return false, "expected KEY VALUE, got " .. quote(s)
  end
  state.values[key] = value
end

function H.view(state, arg)
  if arg == nil then return state.values end
  return state.values[trim(arg)]
end

function H.dump(state)
  local values = state.values
  state.values = {}
  return values
end

return H
