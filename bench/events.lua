-- wrk script for the burst rows and the HTTP throughput rows: POST events, each request with its
-- own Idempotency-Key.
--
--   wrk -t2 -c64 -d10s -s bench/events.lua URL -- BATCH TOKEN RUN [NAME QUOTA]
--
-- BATCH: events per request (1: one envelope object; more: a JSON array of envelopes, the
-- bridge's batch form). TOKEN: the bearer token ("" for none). RUN: a prefix that keeps keys of
-- different runs apart. A key is RUN-THREAD-COUNTER, unique across threads and requests.
-- NAME: the events' name ("burst" unless given). QUOTA: requests per thread, 0 for as many as the
-- duration allows. A thread that has its QUOTA answers writes "quota THREAD" and stops; its
-- connections send nothing more meanwhile. wrk itself still waits for the duration: the bench
-- interrupts it once every thread has written its line.
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
    local name = args[4] or "burst"
    quota = tonumber(args[5]) or 0
    counter = 0
    granted = 0 -- requests let go (delay() is asked once before each; request() once more by wrk)
    answered = 0
    statuses = {}
    local one = '{"name":"' .. name .. '","payload":{"n":1}}'
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

function delay()
    if quota > 0 and granted >= quota then
        return 3600000 -- the quota is sent: this connection waits for the thread to stop
    end
    granted = granted + 1
    return 0
end

function request()
    counter = counter + 1
    headers["Idempotency-Key"] = run .. "-" .. tid .. "-" .. counter
    return wrk.format("POST", nil, headers, body)
end

function response(status, hdrs, resp_body)
    statuses[status] = (statuses[status] or 0) + 1
    answered = answered + 1
    if quota > 0 and answered == quota then
        io.write(string.format("quota %d\n", tid))
        io.flush()
        wrk.thread:stop()
    end
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
