"""The `mlx-moe` command."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .launch import launch_command

DEMO_DIR = Path(os.environ.get("MLX_MOE_HOME", Path.home() / ".cache" / "mlx-moe")) / "demo-qwen3-moe-4bit"


def _add_cluster_args(p):
    p.add_argument("--hosts", default="127.0.0.1,127.0.0.1",
                   help="comma-separated hosts, one rank each; localhost/127.0.0.1 run here, others over ssh "
                        "(default: two local ranks)")
    p.add_argument("--hostfile", help="an mlx.launch JSON hostfile (e.g. from mlx.distributed_config) instead of --hosts")
    p.add_argument("--backend", default="ring", choices=["ring", "jaccl", "auto"],
                   help="mx.distributed backend: ring (TCP), jaccl (Thunderbolt 5 RDMA) or auto (from the hostfile)")
    p.add_argument("--python", help="the Python interpreter on the remote hosts (default: this one's path)")
    p.add_argument("--strategy", default="auto", choices=["auto", "expert", "pipeline"],
                   help="auto: expert parallel for MoE models, else pipeline")
    p.add_argument("--max-collective-bytes", type=int, default=None,
                   help="largest message any collective sends; bigger ones are split "
                        "(default 512 KiB, or $MLX_MOE_MAX_COLLECTIVE_BYTES)")


def _launch(args, argv):
    cmd = launch_command(argv, hosts=args.hosts.split(","), backend=args.backend,
                         hostfile=args.hostfile, python=args.python)
    return subprocess.call(cmd, stdin=subprocess.PIPE)


def cmd_generate(args):
    argv = ["-m", "mlx_moe.generate", "--model", args.model, "--prompt", args.prompt,
            "--max-tokens", str(args.max_tokens), "--strategy", args.strategy]
    if args.max_collective_bytes:
        argv += ["--max-collective-bytes", str(args.max_collective_bytes)]
    return _launch(args, argv)


def cmd_demo(args):
    from .synthetic import synthesize

    path = synthesize(DEMO_DIR, "qwen3_moe", layers=4, hidden=128, experts=8, top_k=2, quantize=4)
    print(f"synthetic 4-bit qwen3_moe checkpoint: {path}", file=sys.stderr)
    args.hosts, args.hostfile, args.backend, args.python, args.strategy = (
        "127.0.0.1,127.0.0.1", None, "ring", None, "expert")
    argv = ["-m", "mlx_moe.generate", "--model", str(path),
            "--prompt", "Tell me about experts.", "--max-tokens", str(args.max_tokens)]
    return _launch(args, argv)


def cmd_synth(args, rest):
    from .synthetic import main as synth_main

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

    g = sub.add_parser("generate", help="one-shot generation on a cluster, streamed to the terminal")
    g.add_argument("--model", required=True, help="Hugging Face repo id or local mlx-lm checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    _add_cluster_args(g)
    g.set_defaults(func=cmd_generate)

    sub.add_parser("synth", help="write a small synthetic checkpoint (see mlx-moe synth --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "synth":
        return cmd_synth(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
