import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate, load, stream_generate
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mlx_moe.checkpoints.synthetic import main, synthesize

PROMPT = [{"role": "user", "content": "Tell me a story about a dragon."}]
FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "synthetic.json",
]


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def moe_f32(ckpt_dir):
    return synthesize(ckpt_dir / "moe_f32")


@pytest.fixture(scope="session")
def moe_q4(ckpt_dir):
    return synthesize(ckpt_dir / "moe_q4", quantize=4)


@pytest.fixture(scope="session")
def loaded_f32(moe_f32):
    return load(str(moe_f32))


def _forward(model, tokenizer, text="The river ran quietly"):
    ids = tokenizer.encode(text)
    logits = model(mx.array([ids]))
    mx.eval(logits)
    return ids, logits


@pytest.mark.parametrize("which", ["moe_f32", "moe_q4"])
def test_qwen3_moe_loads_and_runs(which, request):
    path = request.getfixturevalue(which)
    for name in FILES:
        assert (path / name).is_file(), name
    model, tokenizer, config = load(str(path), return_config=True)
    assert config["model_type"] == "qwen3_moe"
    ids, logits = _forward(model, tokenizer)
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert logits.dtype == mx.float32
    assert np.isfinite(np.array(logits)).all()


def test_4bit_uses_quantized_switch_layers(moe_q4):
    model, _, config = load(str(moe_q4), return_config=True)
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["group_size"] == 32
    for layer in model.layers:
        switch = layer.mlp.switch_mlp
        for proj in (switch.gate_proj, switch.up_proj, switch.down_proj):
            assert isinstance(proj, QuantizedSwitchLinear)
            assert proj.bits == 4 and proj.group_size == 32


def test_config_values(moe_f32):
    config = json.loads((moe_f32 / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert config["hidden_size"] == 64
    assert config["num_experts"] == 8
    assert config["num_experts_per_tok"] == 2
    assert config["moe_intermediate_size"] % 64 == 0
    assert config["max_position_embeddings"] >= 8192
    assert config["tie_word_embeddings"] is False


def test_same_seed_same_bytes_other_seed_differs(moe_f32, ckpt_dir):
    again = synthesize(ckpt_dir / "moe_f32_again")
    other = synthesize(ckpt_dir / "moe_f32_seed1", seed=1)
    weights = (moe_f32 / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (again / "tokenizer.json").read_bytes() == (moe_f32 / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights


def test_reuses_matching_checkpoint_and_rebuilds_on_change(tmp_path):
    path = tmp_path / "m"
    synthesize(path, layers=1)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert synthesize(path, layers=1) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    synthesize(path, layers=2, overrides={"rope_theta": 500000.0})
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["rope_theta"] == 500000.0


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        synthesize(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 64"):
        synthesize(tmp_path / "q", hidden=96, quantize=4)
    with pytest.raises(ValueError, match="unknown arch"):
        synthesize(tmp_path / "a", arch="gpt9")
    assert not any(tmp_path.iterdir())


def test_tokenizer_round_trip_and_chat_template(loaded_f32, moe_f32):
    _, tokenizer = loaded_f32
    text = "Hello, world! Ünïcode ✓ and numbers 12345.\n\tTabs too."
    assert tokenizer.decode(tokenizer.encode(text)) == text

    chat = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")
    assert chat.startswith("<|im_start|>user\nTell me a story")

    config = json.loads((moe_f32 / "config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config["eos_token_id"] == im_end
    assert im_end in tokenizer.eos_token_ids
    assert 400 <= config["vocab_size"] <= 512


def test_greedy_generation_is_varied_with_clear_margins(loaded_f32):
    model, tokenizer = loaded_f32
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)

    text = generate(model, tokenizer, prompt, max_tokens=16)
    assert len(set(tokenizer.encode(text))) > 1

    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=16)]
    assert len(tokens) == 16 and len(set(tokens)) > 4

    # Greedy choices must not hinge on float noise (distributed vs single run).
    logits = np.array(model(mx.array([prompt + tokens[:-1]]))[0])
    top2 = np.sort(logits, axis=-1)[:, -2:]
    gaps = top2[:, 1] - top2[:, 0]
    assert gaps.min() > 1e-3
    assert np.median(gaps) > 0.1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_archs_load_and_run(arch, ckpt_dir):
    path = synthesize(ckpt_dir / arch, arch, layers=2)
    model, tokenizer, config = load(str(path), return_config=True)
    assert config["model_type"] == arch
    assert "num_experts" not in config
    ids, logits = _forward(model, tokenizer)
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert np.isfinite(np.array(logits)).all()
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=8)]
    assert len(set(tokens)) > 1


def test_cli_prints_path_and_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--layers", "1", "--experts", "4", "--top-k", "1", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == str(out)
    assert "qwen3_moe" in lines[-1] and "1 layers" in lines[-1]
    assert "4 experts" in lines[-1] and "top-1" in lines[-1] and "bytes" in lines[-1]
    assert json.loads((out / "config.json").read_text())["num_experts"] == 4
