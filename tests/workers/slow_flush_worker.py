"""Rank 0's HTTP server and its stop on a failure, without a model: one
streamed response that takes its error (and stops counting as open) and
writes it LAG seconds later, as a loaded machine may. Prints "ready" once
it serves on the port given; exits with _stop_rank0's code.

    python slow_flush_worker.py PORT"""

import argparse
import asyncio
import sys
import threading
import types

from mlx_moe.serve import rank

LAG = 1.5  # longer than any fixed wait the stop could guess

engine = types.SimpleNamespace(open_responses=0)
failed = threading.Event()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    engine.open_responses += 1
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
    # The cluster fails: every job gets its error, then rank 0 stops.
    threading.Thread(target=lambda: (failed.set(), rank._stop_rank0(engine, http, 3))).start()
    await asyncio.get_running_loop().run_in_executor(None, failed.wait)
    engine.open_responses -= 1  # as app.py counts: when the error is taken, before it is written
    await asyncio.sleep(LAG)
    await send({"type": "http.response.body", "body": b"error\n"})


args = argparse.Namespace(host="127.0.0.1", port=int(sys.argv[1]), model="stand-in")
switch, http = rank.serve_http(args, 1)
ready = threading.Event()
ready.set()
switch.switch(app, ready)
print("ready", flush=True)
threading.Event().wait()  # until _stop_rank0 exits the process
