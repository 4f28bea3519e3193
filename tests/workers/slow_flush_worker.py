"""The front's HTTP server and its stop after a failure, without a model:
one streamed response that takes its error (and stops counting as open)
and writes it LAG seconds later, as a loaded machine may. Prints "ready"
once it serves on the port given; exits with code 3 once Front.stop returns.

    python slow_flush_worker.py PORT"""

import argparse
import asyncio
import os
import sys
import threading
import types

from mlx_moe.serve.front.process import Front

LAG = 1.5  # longer than any fixed wait the stop could guess

engine = types.SimpleNamespace(open_responses=0, fail=lambda reason: None)
failed = threading.Event()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    engine.open_responses += 1
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
    # The ranks have ended: every job gets its error, then the front stops.
    threading.Thread(target=lambda: (failed.set(), front.stop(None), os._exit(3))).start()
    await asyncio.get_running_loop().run_in_executor(None, failed.wait)
    engine.open_responses -= 1  # as app.py counts: when the error is taken, before it is written
    await asyncio.sleep(LAG)
    await send({"type": "http.response.body", "body": b"error\n"})


args = argparse.Namespace(host="127.0.0.1", port=int(sys.argv[1]), model="stand-in", api_key=None)
front = Front(args, "127.0.0.1", "key", 1)
front.client = engine
ready = threading.Event()
ready.set()
front.switch.switch(app, ready)
print("ready", flush=True)
threading.Event().wait()  # until the stop exits the process
