-- Shared by the wrk scripts: counts responses by HTTP status in every thread and prints them,
-- with latency percentiles, when the run ends. Loaded with dofile() from the scripts beside it.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   statuses = {}
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local totals = {}
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do
         totals[status] = (totals[status] or 0) + count
      end
   end
   io.write("------------------------------\n")
   io.write(string.format("requests/s: %.1f\n", summary.requests / (summary.duration / 1e6)))
   for _, p in ipairs({50, 90, 99}) do
      io.write(string.format("latency p%d: %.2f ms\n", p, latency:percentile(p) / 1000))
   end
   for status, count in pairs(totals) do
      io.write(string.format("status %d: %d\n", status, count))
   end
   local e = summary.errors
   io.write(string.format("socket errors: connect %d, read %d, write %d, timeout %d\n",
                          e.connect, e.read, e.write, e.timeout))
end
