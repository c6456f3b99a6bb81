-- Sets wrk's method, body and headers from the environment (see benchmarks/_wrk.py):
--   WRK_METHOD   e.g. POST
--   WRK_BODY     the request body, sent as is
--   WRK_HEADERS  "Name: value" lines separated by newlines
-- Only static fields are set (no request()/response() callbacks), so wrk keeps its fast path
-- of one pre-built request per connection.
wrk.method = os.getenv("WRK_METHOD") or "GET"

local body = os.getenv("WRK_BODY")
if body ~= nil and body ~= "" then
  wrk.body = body
end

local headers = os.getenv("WRK_HEADERS") or ""
for line in string.gmatch(headers, "[^\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  if name ~= nil then
    wrk.headers[name] = value
  end
end
