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
    error("latest: takes no config (expected null or {})", 0)
  end
  -- values: key -> last value (a non-empty string).
  return { values = {} }
end

function H.send(state, event)
  local s = trim(event)
  if s == "" then return false, "empty event (expected KEY VALUE)" end
  local sp = find(s, " ", 1, true)
  if sp == nil then return false, "expected KEY VALUE, got " .. quote(s) end
  -- s is trimmed, so its first and last bytes are not whitespace: 1 < sp < #s,
  -- and both parts are non-empty after trimming.
  state.values[trim(sub(s, 1, sp - 1))] = trim(sub(s, sp + 1))
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
