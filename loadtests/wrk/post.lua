-- POST requests for wrk, cycled from a manifest; prints the results as one JSON line.
-- Written for loadtests/bench/ (wrk.py, measure.py), which writes the manifest and reads the JSON:
--   wrk -t1 -c64 -d8s -s loadtests/wrk/post.lua http://127.0.0.1:8000 -- requests.tsv
-- Manifest: one request per line, tab-separated: path, body file, then "Name: value" headers.
-- Requests are formatted once in init() and only cycled per request (cheap for the generator).

local requests, n, i = {}, 0, 0

local function split(line)
  local fields = {}
  for field in string.gmatch(line, "[^\t]+") do
    fields[#fields + 1] = field
  end
  return fields
end

function init(args)
  local manifest = assert(args[1], "usage: wrk ... -s post.lua URL -- MANIFEST")
  for line in io.lines(manifest) do
    local f = split(line)
    if #f >= 2 then
      local headers = {}
      for k = 3, #f do
        local name, value = string.match(f[k], "^([^:]+):%s*(.*)$")
        headers[name] = value
      end
      local file = assert(io.open(f[2], "rb"))
      local body = file:read("*a")
      file:close()
      n = n + 1
      requests[n] = wrk.format("POST", f[1], headers, body)
    end
  end
  assert(n > 0, "no requests in " .. manifest)
end

function request()
  i = i % n + 1
  return requests[i]
end

-- Latencies are in microseconds. status = responses with a status above 399 (wrk's own count).
function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
      .. '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},'
      .. '"latency_us":{"min":%.1f,"mean":%.1f,"stdev":%.1f,"max":%.1f,'
      .. '"p50":%.1f,"p75":%.1f,"p90":%.1f,"p99":%.1f,"p99.9":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
