-- wrk script for the HTTP gateway: 200-byte JSON events, every id twice
-- (half duplicates), ids unique per wrk thread and run. BATCH=N posts N
-- events per request to /api/v1/events/batch; without it, one event per
-- request to /api/v1/events.
--   wrk -t2 -c64 -d10s -s examples/scripts/http-load.lua http://127.0.0.1:8080
--   BATCH=1000 wrk -t2 -c16 -d10s -s examples/scripts/http-load.lua http://127.0.0.1:8080
local threads = {}
local pad = string.rep("x", 140)
local run = tostring(os.time())
local batch = tonumber(os.getenv("BATCH") or "0")

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  n = 0
end

local function event()
  n = n + 1
  local id = "r" .. run .. "t" .. tid .. "n" .. math.floor(n / 2)
  return '{"event_id":"' .. id .. '","kind":"load","pad":"' .. pad .. '"}'
end

function request()
  if batch == 0 then
    return wrk.format("POST", "/api/v1/events", {["Content-Type"] = "application/json"}, event())
  end
  local lines = {}
  for i = 1, batch do
    lines[i] = event()
  end
  return wrk.format("POST", "/api/v1/events/batch", {["Content-Type"] = "application/x-ndjson"}, table.concat(lines, "\n"))
end
