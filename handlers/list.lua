-- list: keeps the most recent events, as sent.
--
-- Event:   any bytes, kept exactly as sent (not trimmed; empty events too).
-- view:    JSON array of the kept events, oldest first; [] when there are none.
-- view N:  the last N of them (N a non-negative integer, trimmed), oldest first;
--          any other argument is an error.
-- dump:    what view gives, then the list is emptied.
-- Config:  {"max": N}, 1 <= N <= 1000000, default 1000: how many events are kept.
-- Rejects: nothing.
-- Memory:  at most max events; each send is O(1) (ring buffer).

local trim, quote, describe = bucketly.trim, bucketly.quote, bucketly.describe
local tointeger, move = math.tointeger, table.move

local DEFAULT_MAX = 1000
local MAX_MAX = 1000000

-- Ring buffer, emptied in place (the host keeps the same state table):
--   buf[1..max]  slots; buf[head] holds the newest event (head == 0: none yet)
--   n            events kept, n <= max; they are the n slots ending at head,
--                wrapping from 1 back to max
local function reset(state)
  state.buf, state.head, state.n = {}, 0, 0
end

-- A new array of the last k (<= n) events, oldest first.
local function last(state, k)
  local buf, max = state.buf, state.max
  local out = {}
  local first = (state.head - k) % max + 1 -- slot of the oldest of the k
  local to_end = max - first + 1           -- slots from first to the end of buf
  if k <= to_end then
    move(buf, first, first + k - 1, 1, out)
  else
    move(buf, first, max, 1, out)
    move(buf, 1, k - to_end, to_end + 1, out)
  end
  return bucketly.array(out)
end

local H = {}

function H.init(config)
  local max = DEFAULT_MAX
  if config ~= nil then
    if type(config) ~= "table" then
      error("list: config must be an object like {\"max\": 1000}", 0)
    end
    for k, v in pairs(config) do
      if k ~= "max" then
        error(("list: unknown config key %q (expected max)"):format(tostring(k)), 0)
      end
      local n = type(v) == "number" and tointeger(v)
      if not n or n < 1 or n > MAX_MAX then
        error(("list: max must be an integer from 1 to %d, got %s"):format(
          MAX_MAX, describe(v)), 0)
      end
      max = n
    end
  end
  local state = { max = max }
  reset(state)
  return state
end

function H.send(state, event)
  local head = state.head % state.max + 1
  state.buf[head] = event
  state.head = head
  if state.n < state.max then state.n = state.n + 1 end
end

function H.view(state, arg)
  if arg == nil then return last(state, state.n) end
  local s = trim(arg)
  local k = tonumber(s)
  k = k and tointeger(k)
  if not k or k < 0 then
    error("list: view argument must be a non-negative integer, got " .. quote(s), 0)
  end
  if k > state.n then k = state.n end
  return last(state, k)
end

function H.dump(state)
  local out = last(state, state.n)
  reset(state)
  return out
end

return H
