"""Small, deterministic checkpoints in mlx-lm's on-disk format.

The model is built from mlx-lm's own classes and saved with mlx-lm's own
helpers, so `mlx_lm.load(path)` returns a real model and tokenizer without any
download. Weights are rescaled so that logits are spread out: greedy choices
must not flip on the float noise that separates a distributed run from a
single-process one.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .synthetic_archs import ARCHS as _ARCHS, DENSE_ARCHS
from .synthetic_deepseek import ARCHS as _DEEPSEEK_ARCHS

# Every architecture synthesize writes: model_type -> its config builder.
ARCHS = {**_ARCHS, **_DEEPSEEK_ARCHS}

# Bump when the output for the same arguments changes, so cached checkpoints
# in existing directories are rebuilt.
FORMAT_VERSION = 1

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB = 512

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the tokenizer. It only has to be long enough to yield
# ~512 merges; keeping it in the module makes the tokenizer reproducible.
CORPUS = """\
The river ran quietly through the valley, past the old mill and the stone bridge
where children used to gather in the summer evenings. Nobody remembered who had
built the bridge, but everyone agreed that it was older than the village itself.
In the spring the water rose and carried branches, leaves and sometimes a lost
boat down toward the sea, and the fishermen waited on the banks for it to calm.

A small library stood at the corner of the market square. Its shelves held books
about history, science, cooking, music and the weather, and the librarian knew
where every one of them belonged. Students came in the afternoon to read and to
write their reports, while older visitors preferred the quiet hours of the
morning, when the light through the tall windows was soft and warm.

Computers process information by following instructions written in programs.
A program is a sequence of steps: read a number, compare it with another, store
the result, and repeat until the work is done. Modern machines perform billions
of these steps every second, yet the ideas behind them are simple enough to be
explained with a pencil and a sheet of paper. Memory holds the data, the
processor transforms it, and the network moves it from one machine to another.

Language models predict the next word in a text. They are trained on large
collections of documents and learn which words tend to follow which others.
When a model is asked a question, it writes an answer one token at a time,
choosing each token from a probability distribution over its vocabulary. A
mixture of experts sends every token to a few specialised networks instead of
one large network, which saves computation while keeping the model capacity.

Hello! How are you today? I am fine, thank you. What would you like to talk
about? Tell me a story about a dragon, a king and a clever young girl who
solved a riddle that nobody else could answer. The weather is nice; let us go
for a walk in the park, then have some tea and cake at the cafe near the station.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear often.
"""


def _train_tokenizer(vocab):
    # tokenizers/transformers/mlx_lm are imported where used: they are slow to
    # import and a CLI importing this module for --help should not pay for it.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text encodes and round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    return tok


def _save_tokenizer(tok, path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


# Multipliers on mlx's default init (uniform +-1/sqrt(fan_in) for linears,
# N(0, 1/hidden) for embeddings). The default gives near-uniform logits and
# blocks that barely touch the residual stream; these make the layers matter,
# routing decisive and the next-token choice clear.
EMBED_STD = 1.0  # embeddings: unit std, like the normalised stream
# An embedding that is also the head (hunyuan, lfm2_moe): at unit std the
# current token's own logit (|e|^2) outweighs the rest and greedy decoding
# repeats it forever.
TIED_EMBED_STD = 0.25
BODY_SCALE = 3.0**0.5  # attention/MLP linears: variance preserving (std 1/sqrt(fan_in))
ROUTER_SCALE = 8.0  # router logits std ~4.6: top-k choices far from ties
LM_HEAD_SCALE = 8.0  # logits std ~4.6


def _is_router(name, p, hidden, num_experts):
    """A router: a [>= experts, hidden] weight under a `gate` or `router`
    module (not a gate projection; longcat's also scores identity experts)."""
    parts = name.split(".")
    return (p.ndim == 2 and p.shape[1] == hidden and p.shape[0] >= num_experts
            and ("gate" in parts or "router" in parts))


def _rescale(model, hidden, vocab, num_experts):
    embeddings = {
        f"{path}.weight" for path, m in model.named_modules() if isinstance(m, nn.Embedding)
    }
    flat = tree_flatten(model.parameters())
    head = any(p.ndim == 2 and p.shape == (vocab, hidden) and n not in embeddings for n, p in flat)
    params = []
    for name, p in flat:
        if name in embeddings:
            scale = (EMBED_STD if head else TIED_EMBED_STD) * hidden**0.5
        elif p.ndim == 2 and p.shape == (vocab, hidden):
            scale = LM_HEAD_SCALE
        elif num_experts and _is_router(name, p, hidden, num_experts):
            scale = ROUTER_SCALE
        elif "norm" in name:  # RMSNorm weights stay at 1
            scale = 1.0
        else:
            scale = BODY_SCALE
        params.append((name, p * scale))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def _skew_routers(model, hidden, num_experts, skew):
    """Make low expert ids popular: every embedding gets a constant first
    feature, which the residual stream carries through the layers, and each
    router reads it with a weight falling from +skew to -skew over the
    experts, a bias toward the first ones at every layer."""
    flat = tree_flatten(model.parameters())
    params = []
    for name, p in flat:
        if isinstance(p, mx.array) and p.ndim == 2 and name.endswith("embed_tokens.weight"):
            p = p.at[:, 0].add(-p[:, 0] + 3 * p.std())
        elif num_experts and _is_router(name, p, hidden, num_experts):
            profile = mx.linspace(skew, -skew, p.shape[0]) * p.std() * hidden**0.5
            p = p.at[:, 0].add(-p[:, 0] + profile)
        params.append((name, p))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def _write(path, config, quantize, seed, hidden, vocab, num_experts, router_skew=0.0):
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)  # before construction: the init draws the weights
    model = model_class(args_class.from_dict(config))
    _rescale(model, hidden, vocab, num_experts)
    if router_skew:
        _skew_routers(model, hidden, num_experts, router_skew)
    if quantize == 4:
        # quantize_model prints a bits-per-weight line; keep stdout for the CLI.
        with contextlib.redirect_stdout(sys.stderr):
            model, config = quantize_model(model, config, group_size=32, bits=4)
    save_model(path, model)
    save_config(config, path / "config.json")


def _is_complete(path, meta):
    marker = path / "synthetic.json"
    try:
        return json.loads(marker.read_text()) == meta
    except (OSError, ValueError):
        return False


def synthesize(
    path,
    arch="qwen3_moe",
    *,
    layers=4,
    hidden=64,
    experts=8,
    top_k=2,
    quantize=None,
    seed=0,
    vocab=None,
    overrides=None,
    router_skew=0.0,
    layout="mlx",
) -> Path:
    """Write (or reuse) a synthetic checkpoint at `path` and return the path.

    `quantize` is None (float32) or 4 (4-bit affine, group size 32, via
    mlx-lm's own quantization). `vocab` is the BPE target size (default 512);
    `overrides` updates the generated config last. `router_skew` > 0
    makes the routers favour low expert ids (to study expert placement).
    `layout="hf"` writes the experts one tensor each, as Hugging Face
    checkpoints do, over several files (float32 only; see hf_layout).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if quantize not in (None, 4):
        raise ValueError(f"quantize must be None or 4, got {quantize!r}")
    if layout not in ("mlx", "hf") or (layout == "hf" and quantize):
        raise ValueError(f"layout must be 'mlx' or (float32 only) 'hf', got {layout!r}")
    if quantize and hidden % 64:
        # mlx-lm quantizes the qwen3_moe router with group size 64.
        raise ValueError(f"4-bit needs hidden to be a multiple of 64, got {hidden}")
    path = Path(path)
    meta = {
        "version": FORMAT_VERSION,
        "arch": arch,
        "layers": layers,
        "hidden": hidden,
        "experts": experts,
        "top_k": top_k,
        "quantize": quantize,
        "seed": seed,
        "vocab": vocab,
        "overrides": overrides or {},
    }
    if router_skew:
        meta["router_skew"] = router_skew
    if layout != "mlx":
        meta["layout"] = layout
    # Round-trip through JSON so the comparison with the stored file is exact.
    meta = json.loads(json.dumps(meta))
    if _is_complete(path, meta):
        return path
    if path.exists() and any(path.iterdir()) and not (path / "synthetic.json").exists():
        raise FileExistsError(f"{path} is not empty and not a synthetic checkpoint")

    # Build in a sibling temp dir and rename it into place, so readers (or a
    # second process racing on the same path) never see a half-written one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        tok = _train_tokenizer(vocab or DEFAULT_VOCAB)
        _save_tokenizer(tok, tmp)
        config = ARCHS[arch](layers, hidden, experts, top_k, tok.get_vocab_size())
        config["eos_token_id"] = tok.token_to_id(EOS_TOKEN)
        config.update(overrides or {})
        num_experts = 0 if arch in DENSE_ARCHS else experts
        _write(tmp, config, quantize, seed, hidden, tok.get_vocab_size(), num_experts, router_skew)
        if layout == "hf":
            from .hf_layout import write_hf_layout

            write_hf_layout(tmp)
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        # A process racing on the same path may have finished meanwhile: keep
        # its identical checkpoint rather than pull it from under its readers.
        if _is_complete(path, meta):
            return path
        if path.exists():
            shutil.rmtree(path)  # an empty dir or our own stale checkpoint
        try:
            os.rename(tmp, path)
        except OSError:
            if not _is_complete(path, meta):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _disk_bytes(path):
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mlx-moe synth",
        description="Write a small deterministic mlx-lm checkpoint.",
    )
    parser.add_argument("--arch", default="qwen3_moe", choices=sorted(ARCHS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--quantize", choices=["none", "4"], default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["mlx", "hf"], default="mlx",
                        help="hf: one tensor per expert over several files, as Hugging Face "
                             "checkpoints hold them (float32)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)

    path = synthesize(
        args.out,
        args.arch,
        layers=args.layers,
        hidden=args.hidden,
        experts=args.experts,
        top_k=args.top_k,
        quantize=None if args.quantize == "none" else int(args.quantize),
        seed=args.seed,
        layout=args.layout,
    )
    moe = "" if args.arch in DENSE_ARCHS else f", {args.experts} experts, top-{args.top_k}"
    print(path)
    print(
        f"{args.arch}: {args.layers} layers{moe}, "
        f"{'float32' if args.quantize == 'none' else '4-bit'}, "
        f"{_disk_bytes(path)} bytes on disk"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())