-- wrk script: POST /appointments with a unique Idempotency-Key per request.
local counter = 0
local thread_id = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(os.time() + tid)
  prefix = string.format("%d-%d-", tid, math.random(1, 1e9))
end
function request()
  counter = counter + 1
  return wrk.format("POST", "/appointments", {
    ["X-API-Key"] = "demo-receptionist",
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }, '{"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}')
end
