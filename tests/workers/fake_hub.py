"""A stand-in for the Hugging Face hub that serves a local checkpoint
directory: the loader's real hub calls (snapshot_download, the safetensors
headers, config.json) run against it, and it records what was asked for."""

import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

from mlx_moe.checkpoints.checkpoint import read_header, weight_files


class FakeHub:
    def __init__(self, source, dest):
        self.source, self.dest = Path(source), Path(dest)
        self.requests = []  # allow_patterns of each snapshot_download

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **_):
        self.requests.append(allow_patterns)
        self.dest.mkdir(parents=True, exist_ok=True)
        for f in self.source.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copyfile(f, self.dest / f.name)
        return str(self.dest)

    def hf_hub_download(self, repo_id, filename, revision=None, **_):
        return str(self.source / filename)

    def get_safetensors_metadata(self, repo_id, revision=None, **_):
        files = {}
        for name in weight_files(self.source):
            tensors = {k: SimpleNamespace(dtype=m["dtype"], shape=m["shape"])
                       for k, m in read_header(self.source / name)[1].items()}
            files[name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    def patches(self):
        """(name, function) pairs to set on the huggingface_hub module."""
        return [(n, getattr(self, n)) for n in ("snapshot_download", "hf_hub_download",
                                                "get_safetensors_metadata")]
