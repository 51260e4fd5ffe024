-- wrk script: POST 200-byte JSON events to /api/v1/events, every id twice
-- (half duplicates), ids unique per wrk thread and run.
--   wrk -t2 -c64 -d10s -s examples/scripts/http-post.lua http://127.0.0.1:8080
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
  n = n + 1
  local id = "r" .. run .. "t" .. tid .. "n" .. math.floor(n / 2)
  local body = '{"event_id":"' .. id .. '","kind":"load","pad":"' .. pad .. '"}'
  return wrk.format("POST", "/api/v1/events", {["Content-Type"] = "application/json"}, body)
end
