-- wrk script for the burst rows: POST events, each request with its own Idempotency-Key.
--
--   wrk -t2 -c64 -d10s -s bench/events.lua URL -- BATCH TOKEN RUN
--
-- BATCH: events per request (1: one envelope object; more: a JSON array of envelopes, the
-- bridge's batch form). TOKEN: the bearer token ("" for none). RUN: a prefix that keeps keys of
-- different runs apart. A key is RUN-THREAD-COUNTER, unique across threads and requests.
-- At the end one line per status code: "status CODE COUNT" (summed over threads), which the
-- bench parses (wrk itself only counts "Non-2xx or 3xx responses").

local threads = {}

function setup(thread)
    thread:set("tid", #threads + 1)
    table.insert(threads, thread)
end

function init(args)
    batch = tonumber(args[1]) or 1
    token = args[2] or ""
    run = args[3] or "wrk"
    counter = 0
    statuses = {}
    local one = '{"name":"burst","payload":{"n":1}}'
    if batch > 1 then
        local items = {}
        for i = 1, batch do
            items[i] = one
        end
        body = "[" .. table.concat(items, ",") .. "]"
    else
        body = one
    end
    headers = {["Content-Type"] = "application/json"}
    if token ~= "" then
        headers["Authorization"] = "Bearer " .. token
    end
end

function request()
    counter = counter + 1
    headers["Idempotency-Key"] = run .. "-" .. tid .. "-" .. counter
    return wrk.format("POST", nil, headers, body)
end

function response(status, hdrs, resp_body)
    statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
    local total = {}
    for _, thread in ipairs(threads) do
        local counts = thread:get("statuses")
        for code, n in pairs(counts) do
            total[code] = (total[code] or 0) + n
        end
    end
    for code, n in pairs(total) do
        io.write(string.format("status %d %d\n", code, n))
    end
    for _, p in ipairs({50, 99}) do
        io.write(string.format("latency p%d %.3f ms\n", p, latency:percentile(p) / 1000.0))
    end
end
