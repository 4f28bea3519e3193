"""The `mlx-moe` command."""

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .cluster.failures import FirstFailure
from .cluster.hosts import HostError, resolve
from .cluster.launch import free_port, launch_command, start, stop_group, wait_ready
from .cluster.progress import ENV as PROGRESS_ENV, Board
from .serve.engine.homes import ATTENTION

DEMO_DIR = Path(os.environ.get("MLX_MOE_HOME", Path.home() / ".cache" / "mlx-moe")) / "demo-qwen3-moe-4bit"


def _add_cluster_args(p):
    p.add_argument("--hosts", default="127.0.0.1,127.0.0.1",
                   help="comma-separated hosts, one rank each, rank 0 first (default: two ranks here). "
                        "localhost/127.0.0.1 run here; other names or addresses are reached with "
                        "key-based ssh, checked first, and given the address the other ranks reach "
                        "them at (their Thunderbolt bridge, else the one ssh reached). Every host "
                        "needs the same Python path (--python) with mlx-moe, and a local checkpoint "
                        "at the same path. See docs/MULTIHOST.md")
    p.add_argument("--hostfile", help="an mlx.launch JSON hostfile instead of --hosts, e.g. the output of "
                                      "mlx.distributed_config (ring or JACCL); addresses it lacks are found "
                                      "as for --hosts")
    p.add_argument("--backend", default=None, choices=["ring", "jaccl", "jaccl-ring"],
                   help="mx.distributed backend: ring (TCP over any network, the default), jaccl or "
                        "jaccl-ring (Thunderbolt 5 RDMA; need a --hostfile with RDMA devices); "
                        "default: the hostfile's, else ring")
    p.add_argument("--python", help="the Python interpreter on every host (default: this one's path, "
                                    "which must then exist on every host)")
    p.add_argument("--strategy", default="auto", choices=["auto", "expert", "hybrid", "tensor", "pipeline"],
                   help="auto: expert parallel for MoE models, else pipeline; hybrid: expert-parallel "
                        "experts with attention split by heads and dense MLPs and shared experts by "
                        "tensor parallel; tensor: every block, experts included, split by tensor "
                        "parallel (as mlx-lm's sharded_load)")
    p.add_argument("--max-collective-bytes", type=int, default=None,
                   help="largest message any collective sends; bigger ones are split "
                        "(default 512 KiB, or $MLX_MOE_MAX_COLLECTIVE_BYTES)")
    p.add_argument("--placement", default="contiguous",
                   help="which experts each rank holds: contiguous (default), balanced (from "
                        "--expert-load) or a placement file from 'mlx-moe placement'; files must be "
                        "at the same path on every host")
    p.add_argument("--expert-load", help="measured expert loads for --placement balanced: a saved "
                                         "GET /metrics, or JSON {\"layers\": {block: [count per expert]}}")


def _placement_argv(args):
    placement, load = getattr(args, "placement", "contiguous"), getattr(args, "expert_load", None)
    if placement == "balanced" and not load:
        raise SystemExit("mlx-moe: --placement balanced needs --expert-load FILE (save GET /metrics "
                         "of a server that has answered typical requests)")
    return ["--placement", placement] + (["--expert-load", load] if load else [])


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _cluster(args):
    """The command's hosts, checked over ssh and given addresses (once)."""
    if "cluster" not in vars(args):
        args.cluster = resolve(args.hosts.split(","), args.hostfile, args.backend,
                               python=args.python or sys.executable, model=args.model)
    return args.cluster


def _launch(args, argv, notify=None, on_progress=None):
    """Run the ranks until they finish; Ctrl-C or SIGTERM stops every rank.

    mlx.launch stops the other ranks when one exits but itself exits 0, so
    its log is read here to tell a failed rank from a clean stop, and
    `notify(reason)` passes the reason on (to rank 0, for its clients).
    The ranks' loading progress lines are taken out of their output and
    shown as one line per rank (progress.Board); `on_progress(entries)`
    gets each change."""
    cluster = _cluster(args)
    if cluster.path:
        print(f"mlx-moe: {cluster.describe()}", file=sys.stderr)
    env = [*getattr(args, "rank_env", ()), f"{PROGRESS_ENV}=1", "HF_HUB_DISABLE_PROGRESS_BARS=1"]
    cmd = launch_command(argv, hosts=args.hosts.split(","), backend=cluster.backend, hostfile=cluster.path,
                         python=args.python, env=env)
    proc = start(cmd, remote=cluster.remote, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stopping = []

    def kill_later(seconds):
        # A stopped (SIGSTOP) rank ignores SIGTERM, and mlx.launch waits for it.
        timer = threading.Timer(seconds, _signal_group, (proc, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    def on_failure(reason):
        if notify:
            notify(reason)
        kill_later(20)

    watch = FirstFailure(on_failure, hosts=cluster.names)
    board = Board(cluster.names, sys.stderr, on_progress)

    def relay(source, sink):
        # Chunks, not lines: generate streams tokens without newlines. Remote
        # ranks' output (stderr too) arrives on stdout, as mlx.launch runs
        # them under `ssh -tt`, with "\r\n" line ends.
        pending, held = b"", b""
        while chunk := os.read(source.fileno(), 65536):
            chunk, held = board.relay(sink, held + chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not stopping:
                    watch.feed(line.decode(errors="replace").rstrip("\r"))

    readers = [threading.Thread(target=relay, args=pipe, daemon=True)
               for pipe in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for reader in readers:
        reader.start()

    def on_signal(signum, frame):
        # Only signal here: the main thread is inside proc.wait() and holds
        # its lock, so waiting in the handler would deadlock.
        stopping.append(signum)
        _signal_group(proc, signal.SIGTERM)
        kill_later(10)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
        for reader in readers:
            reader.join(5)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _signal_group(proc, signal.SIGKILL)  # no rank outlives the command
    if stopping:
        print("mlx-moe: stopped every rank", file=sys.stderr)
        return 0
    if watch.settle():
        print(f"mlx-moe: {watch.failure}; every rank was stopped", file=sys.stderr)
        return 1
    if rc != 0:
        print(f"mlx-moe: mlx.launch exited with code {rc}; every rank was stopped", file=sys.stderr)
    return rc


def _rank_argv(module, args, *extra):
    """A rank program's command line: the model and sharding options every rank program takes, then `extra`."""
    argv = ["-m", module, "--model", args.model, "--strategy", args.strategy, *_placement_argv(args), *extra]
    if args.max_collective_bytes:
        argv += ["--max-collective-bytes", str(args.max_collective_bytes)]
    return argv


def _serve_argv(args):
    argv = _rank_argv("mlx_moe.serve.engine.rank", args, "--port", str(args.port))
    for flag in ("max_context", "watchdog_timeout", "max_concurrency", "max_queue",
                 "prefill_step_size", "prompt_cache_bytes", "attention"):
        if getattr(args, flag, None) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv


def cmd_serve(args):
    """The front process (serve/front.py) here, the ranks through mlx.launch."""
    from .serve.channel import ADDRESS_ENV, KEY_ENV
    from .serve.front.process import Front

    cluster = _cluster(args)
    key = secrets.token_hex(16)
    try:
        front = Front(args, cluster.front, key, len(cluster.names))
    except OSError as e:
        print(f"mlx-moe: {e}", file=sys.stderr)
        return 2
    args.rank_env = [f"{KEY_ENV}={key}", f"{ADDRESS_ENV}={front.address}"]
    failures = []

    def failed(reason):
        failures.append(reason)
        front.failed(reason)

    rc = _launch(args, _serve_argv(args), failed, front.progress)
    if rc != 0 and not failures:
        failures.append(f"the ranks exited (mlx.launch exited with code {rc})")
    front.stop(failures[0] if failures else None)
    return rc


def cmd_generate(args):
    return _launch(args, _rank_argv("mlx_moe.generate", args, "--prompt", args.prompt,
                                    "--max-tokens", str(args.max_tokens)))


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def cmd_demo(args):
    from .checkpoints.synthetic import synthesize

    path = synthesize(DEMO_DIR, "qwen3_moe", layers=4, hidden=128, experts=8, top_k=2, quantize=4)
    print(f"synthetic 4-bit qwen3_moe checkpoint: {path}", file=sys.stderr)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_moe.cli", "serve", "--model", str(path), "--port",
                             str(port), "--strategy", "expert"], preexec_fn=os.setpgrp)
    try:
        wait_ready(url, proc)
        question = "Tell me about the river."
        t0 = time.perf_counter()
        answer = _post(url + "/v1/chat/completions", {
            "model": str(path), "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens, "temperature": 0})
        elapsed = time.perf_counter() - t0
        with urllib.request.urlopen(url + "/v1/plan", timeout=30) as r:
            plan = json.load(r)["plan"]
        usage = answer["usage"]
        print(f"\nplan:\n{plan}\n")
        print(f"user: {question}")
        print(f"assistant (random weights, so noise): {answer['choices'][0]['message']['content']!r}")
        print(f"{usage['completion_tokens']} tokens in {elapsed:.2f}s: "
              f"{usage['completion_tokens'] / elapsed:.1f} tok/s end to end over HTTP, 2 ranks")
    finally:
        stop_group(proc)
    print("demo done: server stopped", file=sys.stderr)
    return 0


def cmd_placement(args):
    from .parallel.placement import balanced, read_loads, report, write_placement

    loads = read_loads(args.expert_load)
    placement = balanced(loads, args.ranks)
    print(report(loads, placement, args.ranks))
    write_placement(placement, args.output)
    print(f"wrote {args.output}; serve with --placement {args.output}", file=sys.stderr)
    return 0


def cmd_plan(args):
    from .planner.batchmodel import batch_estimates, format_batch, parse_concurrency
    from .planner.costmodel import format_report, make_report
    from .planner.model import Model
    from .planner.profiles import load_profiles, make_hosts
    from .checkpoints.headers import read_checkpoint
    from .parallel.plan import PlanError

    chips, links = load_profiles()
    try:
        if args.link not in links:
            raise ValueError(f"unknown link {args.link!r}; known links: {', '.join(links)}")
        concurrency = parse_concurrency(args.concurrency) if args.concurrency is not None else None
        hosts = make_hosts(args.hosts, args.chip, args.memory, args.usable, chips)
        report = make_report(Model.read(read_checkpoint(args.model, args.revision)), hosts, links[args.link],
                             args.context, args.decode_at)
        batch = batch_estimates(report, concurrency) if concurrency else None
    except (ValueError, FileNotFoundError, PlanError) as e:
        print(f"mlx-moe plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        data = report.to_json()
        if batch is not None:
            data["batch"] = [b.to_json() for b in batch]
        print(json.dumps(data, indent=1))
    else:
        print(format_report(report) + (f"\n\n{format_batch(report, batch)}" if batch is not None else ""))
    return 0


def cmd_synth(args, rest):
    from .checkpoints.synthetic import main as synth_main

    return synth_main(rest)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mlx-moe",
        description="Expert-parallel inference of MoE models across several Macs (MLX).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthesize a small MoE model and generate on two local ranks (no network)")
    d.add_argument("--max-tokens", type=int, default=32)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="start the cluster and an OpenAI-compatible HTTP endpoint on this machine")
    s.add_argument("--model", required=True, help="Hugging Face repo id or local mlx-lm checkpoint directory")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind the HTTP server, which runs here, in this process, whichever host "
                        "runs rank 0 (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    s.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's max_position_embeddings)")
    s.add_argument("--api-key", default=os.environ.get("MLX_MOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $MLX_MOE_API_KEY, else no key)")
    s.add_argument("--watchdog-timeout", type=float, default=60.0,
                   help="stop the cluster when it makes no progress for this many seconds, plus 4x the "
                        "longest of its last 64 steps (a loaded machine is slow, not stalled); the wait "
                        "grows with slow steps up to 4x this timeout (default: 60)")
    s.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body accepted (default: 4 MiB)")
    s.add_argument("--max-concurrency", type=int, default=16,
                   help="requests generated together, in one batch (default: 16)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a place in the batch; more get 429 (default: 64)")
    s.add_argument("--prefill-step-size", type=int, default=None,
                   help="prompt tokens read per step while others decode (default: 512)")
    s.add_argument("--prompt-cache-bytes", type=int, default=None,
                   help="bound of the prefix cache, the KV caches of finished requests kept so a prompt "
                        "that starts the same (a chat's next turn) prefills only its new tokens; 0 turns "
                        "it off (default: a quarter of the free memory of the host with the least)")
    s.add_argument("--attention", choices=ATTENTION, default=None,
                   help="where a batch's attention runs: 'replicated', every rank computes every "
                        "request's attention and holds its KV cache; 'data-parallel', each request "
                        "lives on one home rank, which alone holds its KV cache (about 1/N of the memory) "
                        "and computes its attention, while the MoE layers see every rank's tokens; 'auto', "
                        "replicated for a request alone, data-parallel once two share the batch "
                        "(default: replicated; data-parallel's failure handling under load is still being "
                        "tested)")
    _add_cluster_args(s)
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="one-shot generation on a cluster, streamed to the terminal")
    g.add_argument("--model", required=True, help="Hugging Face repo id or local mlx-lm checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    _add_cluster_args(g)
    g.set_defaults(func=cmd_generate)

    pl = sub.add_parser("placement", help="balance experts over ranks from measured expert loads (EPLB-style)",
                        description="Reads expert loads (a saved GET /metrics of mlx-moe serve, or JSON) "
                                    "and writes a placement that gives each rank the same number of "
                                    "experts with load as even as possible; prints each layer's "
                                    "imbalance (busiest rank / mean) before and after.")
    pl.add_argument("--expert-load", required=True, help="saved GET /metrics, or JSON {\"layers\": {block: [counts]}}")
    pl.add_argument("--ranks", type=int, required=True, help="number of ranks (hosts) to place experts on")
    pl.add_argument("-o", "--output", default="placement.json", help="placement file to write (default: placement.json)")
    pl.set_defaults(func=cmd_placement)

    pn = sub.add_parser(
        "plan", help="will a model fit on these hosts, and how fast will it decode? (reads only config and headers)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Before downloading the weights: read a checkpoint's config.json and safetensors headers "
                    "(from the hub only those files), pick the strategy load_sharded would pick, show what "
                    "each host holds, the bytes per host (weights + KV cache at --context) and whether they "
                    "fit, and predict decode tok/s for expert parallel, mlx-lm tensor parallel, pipeline and "
                    "one host; with --concurrency, also aggregate tok/s and KV cache per host for that many "
                    "requests decoding together (expert parallel with data-parallel or replicated attention). "
                    "The cost model and the chip/link profiles are in docs/PLAN.md.",
        epilog="examples:\n"
               "  mlx-moe plan --model mlx-community/Qwen3-235B-A22B-8bit --hosts mac1,mac2 --link tb5-rdma\n"
               "  mlx-moe plan --model ./DeepSeek-V3-4bit --hosts 4 --chip m3-ultra --memory 512G\n"
               "  mlx-moe plan --model ./model --hosts studio,laptop --chip m3-ultra,m4-max --memory 512G,128G\n"
               "  mlx-moe plan --model ./model --hosts 2 --link tb5-rdma --concurrency 1,8,32 --decode-at 4096")
    pn.add_argument("--model", required=True, help="Hugging Face repo id or local checkpoint directory")
    pn.add_argument("--hosts", default="2", help="host names, comma-separated (mac1,mac2), or a count (4); default 2")
    pn.add_argument("--chip", default=None,
                    help="chip profile, one for all hosts or one per host (default m3-ultra); see docs/PLAN.md")
    pn.add_argument("--memory", default=None,
                    help="memory per host, one for all or one per host, e.g. 512G or 512G,192G "
                         "(default: the chip profile's largest configuration)")
    pn.add_argument("--usable", type=float, default=None,
                    help="fraction of memory weights + KV cache may use (default 0.75, macOS's default GPU "
                         "wired-memory limit; raise it with sysctl iogpu.wired_limit_mb and pass e.g. 0.9)")
    pn.add_argument("--link", default="tb-ip",
                    help="link profile: tb5-rdma (JACCL), tb-ip (ring over IP over Thunderbolt, the default "
                         "backend), ethernet, loopback-ring")
    pn.add_argument("--context", type=int, default=32768,
                    help="tokens of KV cache to budget per host (default 32768, at most the model's maximum)")
    pn.add_argument("--decode-at", type=int, default=0,
                    help="predict decode at this many tokens of context already in the cache (default 0)")
    pn.add_argument("--concurrency", default=None, metavar="N[,N...]",
                    help="also predict decode with N requests at once (e.g. 8 or 1,8,32): aggregate tok/s and "
                         "KV cache per host for expert parallel with data-parallel or replicated attention, "
                         "tensor parallel, pipeline and one host; each request gets --context tokens of KV cache "
                         "and decodes at --decode-at")
    pn.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    pn.add_argument("--json", action="store_true", help="print the report as JSON (with --concurrency: \"batch\")")
    pn.set_defaults(func=cmd_plan)

    sub.add_parser("synth", help="write a small synthetic checkpoint (see mlx-moe synth --help)", add_help=False)
    sub.add_parser("bench", help="compare expert parallel with mlx-lm tensor/pipeline parallel and one process "
                                 "(see mlx-moe bench --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "synth":
        return cmd_synth(args, rest)
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from .parallel.plan import PlanError

    try:
        return args.func(args)
    except (PlanError, HostError, OSError) as e:
        # A request that cannot work: say what and how to fix it, no traceback.
        print(f"mlx-moe: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
