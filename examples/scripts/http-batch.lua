-- wrk script: POST batches of 1000 200-byte events to /api/v1/events/batch,
-- half of them repeats of the line before.
--   wrk -t2 -c16 -d10s -s examples/scripts/http-batch.lua http://127.0.0.1:8080
local threads = {}
local pad = string.rep("x", 140)
local run = tostring(os.time())

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  n = 0
end

function request()
  local lines = {}
  for i = 1, 1000 do
    n = n + 1
    local id = "b" .. run .. "t" .. tid .. "n" .. math.floor(n / 2)
    lines[i] = '{"event_id":"' .. id .. '","kind":"load","pad":"' .. pad .. '"}'
  end
  return wrk.format("POST", "/api/v1/events/batch", {["Content-Type"] = "application/x-ndjson"}, table.concat(lines, "\n"))
end
