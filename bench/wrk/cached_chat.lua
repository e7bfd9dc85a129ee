-- POST /v1/chat/completions with one deterministic body (temperature 0, fixed seed), so after the
-- first answer every request is a response-cache hit: measures the API path around the cache.
-- Prime it once (run.sh does) before timing. Key from OPENAI_API_KEY when auth is on.
--   OPENAI_API_KEY=sk-... wrk -t2 -c32 -d15s -s bench/wrk/cached_chat.lua http://127.0.0.1:8000
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local model = os.getenv("WRK_MODEL") or ""
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("OPENAI_API_KEY")
if key and key ~= "" then
   wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = '{"model": "' .. model .. '", "messages": [{"role": "user", "content": '
   .. '"Name three colours of the rainbow."}], "max_tokens": 16, "temperature": 0, "seed": 7}'
