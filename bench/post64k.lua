-- wrk script: every request is a POST with a 65536-byte body (what bench/apps/echo.py sends back).
wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Content-Length"] = tostring(#wrk.body)
