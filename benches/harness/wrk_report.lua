-- wrk script for benches/run.sh: an optional request from the environment, and a one-line JSON
-- summary (throughput, latency percentiles, slow-response counts, errors) on stdout.
--   WRK_METHOD=POST WRK_BODY='{"model":"m","input":"x"}' wrk -s wrk_report.lua URL
-- No response() callback: it would make wrk parse every response in Lua and slow it down.
local method = os.getenv("WRK_METHOD")
local body = os.getenv("WRK_BODY")
if method and method ~= "" then wrk.method = method end
if body and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  -- latency(i) is the i-th distinct latency (microseconds) and how many responses took it.
  local over10, over30 = 0, 0
  for i = 1, #latency do
    local us, n = latency(i)
    if us >= 10000 then over10 = over10 + n end
    if us >= 30000 then over30 = over30 + n end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"mean_us":%.1f,"over_10ms":%d,"over_30ms":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, over10, over30,
    e.connect, e.read, e.write, e.status, e.timeout))
end
