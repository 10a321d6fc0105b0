-- The wrk script of `tickpipe bench --loader wrk` (tickpipe/lab/bench_wrk.py runs it).
--   wrk -s bench_wrk.lua URL -- single|batch BATCH START_TS_MS STALL_AFTER_S [SYMBOLS]
--   (ticks of B0 to B<SYMBOLS-1> in turn, 64 by default)
--   wrk -s bench_wrk.lua URL -- get PATHS_FILE 0 STALL_AFTER_S   (GETs of the file's
--   paths in turn, one a line: `tickpipe bench --read`)
-- The bearer token comes from TICKPIPE_BENCH_TOKEN (not argv: other users see argv).
-- Every tick has its own (symbol, ts): ts counts up from START_TS_MS, each thread in a
-- range of its own. done() prints one line: REPORT_PREFIX and a JSON object.

local REPORT_PREFIX = "tickpipe-wrk-report "
local THREAD_SPAN_MS = 100000000 -- 10^8 ticks per thread and run: 27 hours of ms keys

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- Defaults for the main Lua state, where wrk checks one request() but runs no init().
local single, size, next_ts, stall_after_s, symbols = true, 1, 0, 10, 64
local get, paths = false, { "/" }
local headers = {}
local ok_count, seen_ok, seen_ok_at = 0, 0, 0
statuses = {}
last_refusal = ""
stalled = ""

function init(args)
  get = args[1] == "get"
  if get then
    paths = {}
    for line in io.lines(args[2]) do
      table.insert(paths, line)
    end
  end
  single = args[1] ~= "batch"
  size = single and 1 or tonumber(args[2])
  next_ts = tonumber(args[3]) + tid * THREAD_SPAN_MS
  stall_after_s = tonumber(args[4])
  symbols = tonumber(args[5] or "64")
  headers = {
    ["Authorization"] = "Bearer " .. (os.getenv("TICKPIPE_BENCH_TOKEN") or ""),
    ["Content-Type"] = "application/json",
  }
  seen_ok_at = os.time()
end

local format = string.format

local function tick(n)
  return format(
    '{"symbol":"B%d","ts":%d,"price":"%d.%02d","volume":%d,"source":"bench"}',
    n % symbols, next_ts + n, 100 + n % 997, (n * 7) % 100, n % 1000
  )
end

local emitted = 0

function request()
  if get then
    emitted = emitted % #paths + 1
    return wrk.format("GET", paths[emitted], headers)
  end
  local body
  if single then
    body = tick(emitted)
  else
    local parts = {}
    for i = 1, size do
      parts[i] = tick(emitted + i - 1)
    end
    body = "[" .. table.concat(parts, ",") .. "]"
  end
  emitted = emitted + size
  return wrk.format("POST", nil, headers, body)
end

function response(status, _headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 200 and status < 300 then
    ok_count = ok_count + 1
    return
  end
  -- The clock is read on refusals only: the acknowledged path stays a counter.
  last_refusal = status .. " " .. string.sub(body, 1, 300)
  local now = os.time()
  if ok_count ~= seen_ok then
    seen_ok, seen_ok_at = ok_count, now
  end
  if now - seen_ok_at > stall_after_s and stalled == "" then
    stalled = format("no tick acknowledged for %d s", now - seen_ok_at)
    io.stderr:write("tickpipe-wrk stalled\n")
    io.stderr:flush()
    wrk.thread:stop()
  end
end

local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c)
    return format("\\u%04x", string.byte(c))
  end) .. '"'
end

function done(summary, latency, _requests)
  local counts, refusal, stall = {}, "", ""
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
    local seen = thread:get("last_refusal")
    if seen ~= "" then refusal = seen end
    local why = thread:get("stalled")
    if why ~= "" then stall = why end
  end
  local parts = {}
  for status, n in pairs(counts) do
    table.insert(parts, format('"%d":%d', status, n))
  end
  local e = summary.errors
  local pct = {}
  for _, p in ipairs({50, 95, 99}) do
    -- Microseconds in wrk's histogram; nil (JSON null) when nothing completed.
    pct[p] = summary.requests > 0 and format("%d", latency:percentile(p)) or "null"
  end
  io.write(REPORT_PREFIX, format(
    '{"requests":%d,"duration_us":%d,"statuses":{%s},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%s,"p95":%s,"p99":%s},"last_refusal":%s,"stalled":%s}\n',
    summary.requests, summary.duration, table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    pct[50], pct[95], pct[99], json_string(refusal), json_string(stall)
  ))
end
