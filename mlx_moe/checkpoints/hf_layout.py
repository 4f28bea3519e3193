"""A synthesized checkpoint rewritten in the original Hugging Face layout:
one tensor per expert (`...experts.{e}.gate_proj.weight`), which mlx-lm's
sanitize stacks into `switch_mlp` tensors when it loads them, split over
several files with an index, experts of different ranks in different files.
"""

import json
import re
from pathlib import Path

import mlx.core as mx

from .checkpoint import INDEX, WEIGHTS

# The names Mixtral-style checkpoints give the projections of an expert.
W_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
STACKED = re.compile(r"^(.*)\.switch_mlp\.(\w+)\.(\w+)$")
EXPERT_FILES = 4  # files of experts, each with a contiguous run of expert ids


def _unstack(weights, names):
    """{file index: {name: tensor}}: the stacked experts split into one
    tensor per expert in files 1.., everything else in file 0."""
    files = [dict() for _ in range(EXPERT_FILES + 1)]
    for key, w in weights.items():
        m = STACKED.match(key)
        if m is None:
            files[0][key] = w
            continue
        prefix, proj, kind = m.groups()
        for e in range(w.shape[0]):
            file = 1 + e * EXPERT_FILES // w.shape[0]
            files[file][f"{prefix}.experts.{e}.{names.get(proj, proj)}.{kind}"] = w[e]
    return files


def _stacks_back(model, weights, files) -> bool:
    """Whether the model's own sanitize turns `files` back into `weights`."""
    try:
        back = model.sanitize({k: v for f in files for k, v in f.items()})
    except KeyError:
        return False
    return back.keys() == weights.keys() and all(mx.array_equal(back[k], weights[k]) for k in weights)


def write_hf_layout(path: Path) -> None:
    """Rewrite the mlx-lm checkpoint at `path` (float32, experts stacked)
    with one tensor per expert, named the way the model's sanitize expects
    (tried: the projections' own names, then Mixtral's w1/w2/w3)."""
    from mlx_lm.utils import _get_classes

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    old = sorted(path.glob(WEIGHTS))
    weights = {}
    for f in old:
        weights.update(mx.load(str(f)))
    if not any(STACKED.match(k) for k in weights):
        raise ValueError(f"{config['model_type']} has no switch_mlp experts to unstack")
    files = next((f for f in (_unstack(weights, {}), _unstack(weights, W_NAMES))
                  if _stacks_back(model, weights, f)), None)
    if files is None:
        raise ValueError(f"mlx-lm's sanitize for {config['model_type']} does not stack tensors named "
                         "experts.<e>.<projection> (nor Mixtral's w1/w2/w3)")
    for f in old:
        f.unlink()
    weight_map, total = {}, 0
    for i, tensors in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        mx.save_safetensors(str(path / name), tensors, metadata={"format": "mlx"})
        weight_map.update({k: name for k in tensors})
        total += sum(v.nbytes for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX).write_text(json.dumps(index, indent=4))
