-- GET /health/live: the HTTP stack alone (routing, middleware, auth skipped), no model work.
--   wrk -t2 -c32 -d15s -s bench/wrk/health.lua http://127.0.0.1:8000
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

wrk.method = "GET"
wrk.path = "/health/live"
