-- stats: summary statistics of numeric events.
--
-- Event:   a number as Lua's tonumber reads it, surrounding whitespace trimmed:
--          "42", "-1.5", "1e3", "0x10". Integers stay integers (min, max, sum
--          and percentiles of integer events are JSON integers).
-- view:    {"count", "sum", "min", "max", "mean", "p50", "p90", "p99"}. With no
--          events in the window only {"count": 0, "sum": 0} (the other fields
--          have no value, and a nil field does not exist in a Lua table).
-- view F:  the single field F (one of the names above, trimmed); null for an
--          unknown name, or for a field without a value.
-- dump:    what view gives, then the window restarts empty.
-- Config:  {"max_samples": N}, 1 <= N <= 1000000, default 10000.
-- Rejects: an empty event, a non-number (`not a number: "abc"`), NaN or ±inf
--          (`not a finite number: "1e999"`).
-- Memory:  at most max_samples numbers (Algorithm R reservoir sampling).
--
-- count, sum, min, max and mean are exact over every event of the window (an
-- integer sum that would overflow 64 bits continues in floating point; float
-- events are summed with ordinary double addition). Percentiles are nearest-rank,
-- sorted[ceil(p/100 * n)] over the samples: exact while the window has at most
-- max_samples events, estimates from a uniform random sample beyond that.

local trim, quote, describe = bucketly.trim, bucketly.quote, bucketly.describe
local math_type, random, huge = math.type, math.random, math.huge
local sort, tointeger = table.sort, math.tointeger

local DEFAULT_MAX_SAMPLES = 10000
local MAX_MAX_SAMPLES = 1000000
local PERCENTILES = { p50 = 50, p90 = 90, p99 = 99 }
local FIELDS = { "count", "sum", "min", "max", "mean", "p50", "p90", "p99" }

-- Empties the window in place (the host keeps the same state table).
--   count     events accepted in the window
--   isum      exact integer sum of the integer events that did not overflow it
--   fsum      sum of everything else; the integer 0 until a float is added, so
--             isum + fsum stays an integer while every event was one
--   min, max  nil while count == 0
--   samples   samples[1..min(count, max_samples)]: a uniform sample of the window
--   sorted    whether samples is in ascending order
local function reset(state)
  state.count, state.isum, state.fsum = 0, 0, 0
  state.min, state.max = nil, nil
  state.samples, state.sorted = {}, true
end

local H = {}

function H.init(config)
  local max_samples = DEFAULT_MAX_SAMPLES
  if config ~= nil then
    if type(config) ~= "table" then
      error("stats: config must be an object like {\"max_samples\": 10000}", 0)
    end
    for k, v in pairs(config) do
      if k ~= "max_samples" then
        error(("stats: unknown config key %q (expected max_samples)"):format(tostring(k)), 0)
      end
      local n = type(v) == "number" and tointeger(v)
      if not n or n < 1 or n > MAX_MAX_SAMPLES then
        error(("stats: max_samples must be an integer from 1 to %d, got %s"):format(
          MAX_MAX_SAMPLES, describe(v)), 0)
      end
      max_samples = n
    end
  end
  local state = { max_samples = max_samples }
  reset(state)
  return state
end

function H.send(state, event)
  local s = trim(event)
  if s == "" then return false, "empty event (expected a number)" end
  local x = tonumber(s)
  if x == nil then return false, "not a number: " .. quote(s) end

  if math_type(x) == "integer" then
    local isum = state.isum
    local t = isum + x
    if (x >= 0) == (t >= isum) then
      state.isum = t
    else -- wrapped around: carry this event in floating point instead
      state.fsum = state.fsum + (x + 0.0)
    end
  else
    if x ~= x or x == huge or x == -huge then
      return false, "not a finite number: " .. quote(s)
    end
    state.fsum = state.fsum + x
  end

  local count = state.count + 1
  state.count = count
  if count == 1 then
    state.min, state.max = x, x
  elseif x < state.min then
    state.min = x
  elseif x > state.max then
    state.max = x
  end

  -- Algorithm R: the count-th event replaces a random sample with probability
  -- max_samples / count, which keeps samples a uniform sample of the window.
  local k = state.max_samples
  if count <= k then
    state.samples[count] = x
    state.sorted = false
  else
    local j = random(count)
    if j <= k then
      state.samples[j] = x
      state.sorted = false
    end
  end
end

-- The value of field name, or nil (unknown name, or no value yet).
local function field(state, name)
  local count = state.count
  if name == "count" then return count end
  if name == "sum" then return state.isum + state.fsum end
  if count == 0 then return nil end
  if name == "min" then return state.min end
  if name == "max" then return state.max end
  if name == "mean" then return (state.isum + state.fsum) / count end
  local p = PERCENTILES[name]
  if p == nil then return nil end
  local samples = state.samples
  if not state.sorted then
    -- Sorting in place is fine: the reservoir's order carries no meaning.
    sort(samples)
    state.sorted = true
  end
  local n = #samples
  return samples[(p * n + 99) // 100] -- ceil(p/100 * n) in exact integer arithmetic
end

function H.view(state, arg)
  if arg ~= nil then return field(state, trim(arg)) end
  local out = {}
  for _, name in ipairs(FIELDS) do out[name] = field(state, name) end
  return out
end

function H.dump(state)
  local out = H.view(state, nil)
  reset(state)
  return out
end

return H
