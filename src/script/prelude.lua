-- Helpers every handler state gets as fields of the global `bucketly` table
-- (documented in handlers/README.md). Loaded as a trusted text chunk before the
-- handler; it returns a table of functions.

local byte, find, sub = string.byte, string.find, string.sub

local P = {}

-- s without leading/trailing whitespace (the bytes %s matches). Returns s itself,
-- without copying, when there is none: the common case costs two byte reads.
function P.trim(s)
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

-- s trimmed and split at its first space into two trimmed, non-empty parts;
-- nil when s has no space after trimming.
function P.split(s)
  s = P.trim(s)
  local sp = find(s, " ", 1, true)
  if sp == nil then return nil end
  -- s is trimmed, so 1 < sp < #s and both parts are non-empty after trimming.
  return P.trim(sub(s, 1, sp - 1)), P.trim(sub(s, sp + 1))
end

-- s split at every occurrence of sep (plain text, not a pattern; default " ") into
-- an array of parts, which may be empty; at most max parts (default: no limit), the
-- last holding the rest of s. An empty sep is an error.
function P.splitall(s, sep, max)
  sep = sep or " "
  if sep == "" then error("bucketly.splitall: the separator must not be empty", 2) end
  local out, n, at = {}, 0, 1
  while max == nil or n < max - 1 do
    local i, j = find(s, sep, at, true)
    if i == nil then break end
    n = n + 1
    out[n] = sub(s, at, i - 1)
    at = j + 1
  end
  out[n + 1] = sub(s, at)
  return out
end

-- s in double quotes for a message, cut to at most 64 bytes (never inside a
-- UTF-8 sequence).
function P.quote(s)
  if #s > 64 then
    local n = 64
    while n > 0 and (byte(s, n + 1) & 0xC0) == 0x80 do n = n - 1 end
    s = sub(s, 1, n) .. "..."
  end
  return '"' .. s .. '"'
end

-- A config value as written in JSON, for an error message.
function P.describe(v)
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) == "table" then return "an object or array" end
  return tostring(v)
end

return P
