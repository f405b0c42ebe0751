import json
import os

import pytest
import torch
import transformers as tf
from models_hf_tiny import CASES, COMMON, hf_model
from safetensors.torch import load_file, save_file

from engine.models import FLAVOURS, build_model, iter_checkpoint, load_pretrained, save_pretrained


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _ids(hf):
    return torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))


def _hf_load(path):
    return tf.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_load_save_roundtrip(case, tmp_path):
    hf = hf_model(case)
    ids = _ids(hf)
    ref = _logits(hf, ids)
    hf.save_pretrained(tmp_path / "src")
    ours = load_pretrained(tmp_path / "src", dtype=torch.float32)
    assert (_logits(ours, ids) - ref).abs().max() <= 1e-5
    save_pretrained(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == hf.config.model_type and cfg["torch_dtype"] == "float32"
    assert cfg["architectures"] == [type(hf).__name__]
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 2]
    assert (_logits(_hf_load(tmp_path / "out"), ids) - ref).abs().max() <= 1e-5
    # The same model as shards with an index: loads back bit-exactly here and in transformers.
    save_pretrained(ours, tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(load_pretrained(tmp_path / "sharded"), ids), _logits(ours, ids))
    assert (_logits(_hf_load(tmp_path / "sharded"), ids) - ref).abs().max() <= 1e-5


def _chatglm_checkpoint(hf, path):
    """Write THUDM glm-4-9b-chat's remote-code layout from an HF `glm` model (independent of hf_io)."""
    c = hf.config
    sd = hf.state_dict()
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.ones(c.head_dim // 4),
    }
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[f"{q}self_attention.query_key_value.{kind}"] = torch.cat(qkv)
        out[q + "self_attention.dense.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "mlp.dense_h_to_4h.weight"] = sd[p + "mlp.gate_up_proj.weight"]
        out[q + "mlp.dense_4h_to_h.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
    cfg = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "num_layers": c.num_hidden_layers,
        "padded_vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size,
        "kv_channels": c.head_dim,
        "num_attention_heads": c.num_attention_heads,
        "multi_query_attention": True,
        "multi_query_group_num": c.num_key_value_heads,
        "layernorm_epsilon": c.rms_norm_eps,
        "rope_ratio": c.rope_parameters["rope_theta"] / 10000,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "seq_length": 4096,
        "eos_token_id": [1, 2],
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "modeling_chatglm.py").write_text("# remote code placeholder\n")
    (path / "tokenizer_config.json").write_text("{}\n")
    return out


def test_chatglm_checkpoint_loads_and_exports_to_glm_and_chatglm(tmp_path):
    hf = hf_model("glm")
    ids = _ids(hf)
    ref = _logits(hf, ids)
    written = _chatglm_checkpoint(hf, tmp_path / "chatglm")
    ours = load_pretrained(tmp_path / "chatglm")
    assert ours.args.rope_theta == hf.config.rope_parameters["rope_theta"] and ours.args.arch == "glm"
    assert (_logits(ours, ids) - ref).abs().max() <= 1e-5

    save_pretrained(ours, tmp_path / "glm")  # default: HF-native glm layout
    assert json.loads((tmp_path / "glm" / "config.json").read_text())["model_type"] == "glm"
    assert (tmp_path / "glm" / "tokenizer_config.json").is_file()  # copied from the source dir
    assert not (tmp_path / "glm" / "modeling_chatglm.py").exists()
    assert (_logits(_hf_load(tmp_path / "glm"), ids) - ref).abs().max() <= 1e-5

    save_pretrained(ours, tmp_path / "back", format="chatglm")
    again = load_file(str(tmp_path / "back" / "model.safetensors"))
    written.pop("transformer.rotary_pos_emb.inv_freq")
    assert set(again) == set(written) and all(torch.equal(again[k], written[k]) for k in written)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (
        cfg["model_type"] == "chatglm" and cfg["rope_ratio"] == hf.config.rope_parameters["rope_theta"] / 1e4
    )
    assert (tmp_path / "back" / "modeling_chatglm.py").is_file()
    assert (_logits(load_pretrained(tmp_path / "back"), ids) - ref).abs().max() <= 1e-5
    # chatglm layout as shards (fused query_key_value split across files is still one tensor per file)
    save_pretrained(ours, tmp_path / "back_sharded", format="chatglm", max_shard_size="30KB")
    index = json.loads((tmp_path / "back_sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written) and len(set(index["weight_map"].values())) > 1
    assert torch.equal(_logits(load_pretrained(tmp_path / "back_sharded"), ids), _logits(ours, ids))


def test_sharded_roundtrip_bf16_and_stale_shards_removed(tmp_path):
    hf = hf_model("qwen2")
    ids = _ids(hf)
    hf.save_pretrained(tmp_path / "src")
    ours = load_pretrained(tmp_path / "src")
    out = tmp_path / "sharded"
    save_pretrained(ours, out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    for s in shards:
        assert (out / s).stat().st_size < 40_000 + 20_000  # one tensor never splits; ours are < 40 KB
    ref = _logits(ours, ids)
    assert torch.equal(_logits(load_pretrained(out), ids), ref)
    assert (_logits(_hf_load(out), ids) - ref).abs().max() <= 1e-5
    n_before = len(list(iter_checkpoint(out)))
    assert n_before == len(dict(ours.named_parameters()))

    # Saving again into the same directory as one bf16 file leaves no stale shard or index behind.
    (out / "train_args.json").write_text("{}")
    save_pretrained(ours, out, dtype=torch.bfloat16)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert not any(n.startswith("model-0") for n in names) and "train_args.json" in names
    b = load_pretrained(out)
    assert b.model.embed_tokens.weight.dtype == torch.bfloat16  # default dtype = the checkpoint's
    assert not any(p.name.startswith(".sharded.tmp") for p in tmp_path.iterdir())


def test_tokenizer_is_saved_and_meta_load_validates(tmp_path):
    class Tok:
        def save_pretrained(self, d):
            with open(os.path.join(d, "tokenizer.json"), "w") as f:
                f.write("{}")

    model = build_model("debug-glm4")
    save_pretrained(model, tmp_path / "a", tokenizer=Tok())
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    meta = load_pretrained(tmp_path / "a", device="meta")
    assert all(p.is_meta for p in meta.parameters()) and meta.args == model.args
    loaded = load_pretrained(tmp_path / "a")
    for (n, p), (m, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n == m and torch.equal(p, q)


def test_debug_flavours_match_the_data_tokenizer():
    from engine.data import load_tokenizer

    for name in ("debug-qwen2", "debug-glm4", "debug-llama"):
        tok = load_tokenizer(name)
        assert tuple(FLAVOURS[name].eos_token_ids) == tuple(tok.eos_token_ids)
        assert tok.vocab_size <= FLAVOURS[name].vocab_size


@pytest.fixture
def sharded_ckpt(tmp_path):
    model = build_model("debug-qwen2")
    save_pretrained(model, tmp_path / "ck", max_shard_size="60KB")
    return tmp_path / "ck"


@pytest.fixture(params=["single", "sharded"])
def ckpt(request, tmp_path):
    """A debug-qwen2 checkpoint as one model.safetensors or as several shards with an index."""
    model = build_model("debug-qwen2")
    save_pretrained(model, tmp_path / "ck", max_shard_size="60KB" if request.param == "sharded" else "5GB")
    assert (tmp_path / "ck" / "model.safetensors.index.json").is_file() == (request.param == "sharded")
    return tmp_path / "ck"


def _header(f):
    n = int.from_bytes(f.read_bytes()[:8], "little")
    header = json.loads(f.read_bytes()[8 : 8 + n])
    header.pop("__metadata__", None)
    return header


def _weight_map(d):
    index = d / "model.safetensors.index.json"
    if not index.is_file():  # single file: every key lives in model.safetensors
        return dict.fromkeys(load_file(str(d / "model.safetensors")), "model.safetensors")
    return json.loads(index.read_text())["weight_map"]


def test_missing_shard_is_named(sharded_ckpt):
    shard = sorted(set(_weight_map(sharded_ckpt).values()))[1]
    (sharded_ckpt / shard).unlink()
    with pytest.raises(ValueError, match=f"{shard}: shard listed in model.safetensors.index.json is missing"):
        load_pretrained(sharded_ckpt)


def test_missing_single_file_is_named(ckpt):
    for f in ckpt.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(ckpt)


def test_truncated_shard_is_named(ckpt):
    shard = sorted(set(_weight_map(ckpt).values()))[-1]
    f = ckpt / shard
    last = max(_header(f).items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard}: truncated .*key '{last}' lies past the end"):
        load_pretrained(ckpt)
    f.write_bytes(f.read_bytes()[:5])  # not even a header
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file"):
        load_pretrained(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: unknown model_type 'mistral'"):
        load_pretrained(ckpt)


def test_missing_config_key_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: missing config key 'hidden_size'"):
        load_pretrained(ckpt)


def _rewrite_shard(d, edit):
    """Apply edit(tensors) to the file holding model.norm.weight and keep the index (if any) consistent."""
    wm = _weight_map(d)
    shard = wm["model.norm.weight"]
    tensors = load_file(str(d / shard))
    edit(tensors)
    save_file(tensors, str(d / shard))
    if (d / "model.safetensors.index.json").is_file():
        wm = {k: v for k, v in wm.items() if v != shard} | {k: shard for k in tensors}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return shard


def test_missing_key_is_named(ckpt):
    _rewrite_shard(ckpt, lambda t: t.pop("model.norm.weight"))
    # Named with the file that should list it: the index of a sharded checkpoint, else the single file.
    where = (
        "model.safetensors.index.json"
        if (ckpt / "model.safetensors.index.json").is_file()
        else "model.safetensors"
    )
    with pytest.raises(ValueError, match=f"{where}: missing key 'model.norm.weight'"):
        load_pretrained(ckpt)


def test_unexpected_key_is_named(ckpt):
    shard = _rewrite_shard(ckpt, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=f"{shard}: unexpected key 'model.extra.weight'"):
        load_pretrained(ckpt)


def test_shape_mismatch_is_named(ckpt):
    shard = _rewrite_shard(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=f"{shard}: key 'model.norm.weight' has shape \\[65\\]"):
        load_pretrained(ckpt)
    with pytest.raises(ValueError, match="model.norm.weight"):
        next(iter_checkpoint(ckpt))  # the trainer's iterator validates before the first tensor


def test_key_in_two_shards_is_refused(sharded_ckpt):
    wm = _weight_map(sharded_ckpt)
    other = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
    tensors = load_file(str(sharded_ckpt / other))
    tensors["model.norm.weight"] = torch.ones(64)  # a second copy, not listed in the index
    save_file(tensors, str(sharded_ckpt / other))
    with pytest.raises(ValueError, match="key 'model.norm.weight' is also stored in"):
        load_pretrained(sharded_ckpt)


def test_listed_key_absent_from_shard_and_bad_format(tmp_path, sharded_ckpt):
    wm = _weight_map(sharded_ckpt)
    wm["model.ghost.weight"] = next(iter(wm.values()))
    (sharded_ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ValueError, match="'model.ghost.weight'"):
        load_pretrained(sharded_ckpt)
    with pytest.raises(ValueError, match="cannot be saved as format 'chatglm'"):
        save_pretrained(build_model("debug-qwen2"), tmp_path / "x", format="chatglm")


def test_save_accepts_wrapped_names_and_rejects_foreign_state(tmp_path):
    model = build_model("debug-glm4")
    state = {
        k.replace("layers.0.", "layers.0._checkpoint_wrapped_module."): v
        for k, v in model.state_dict().items()
    }
    save_pretrained(model, tmp_path / "a", state_dict=state)
    assert torch.equal(load_pretrained(tmp_path / "a").model.layers[0].mlp.down_proj.weight,
                       model.model.layers[0].mlp.down_proj.weight)  # fmt: skip
    state.pop("model.norm.weight")
    with pytest.raises(ValueError, match="missing state_dict key 'model.norm.weight'"):
        save_pretrained(model, tmp_path / "b", state_dict=state)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["debug-qwen2", "debug-glm4", "debug-llama"])
def test_export_writes_a_tokenizer_that_transformers_loads(name, tmp_path):
    from engine.data import load_tokenizer

    tok = load_tokenizer(name)
    save_pretrained(build_model(name), tmp_path / "a", tokenizer=tok)
    assert (tmp_path / "a" / "tokenizer.json").is_file() and (
        tmp_path / "a" / "tokenizer_config.json"
    ).is_file()
    text = "Write 10,000 words about the sea. Ünïcödé ✓"
    want = tok.encode(text)
    assert load_tokenizer(str(tmp_path / "a")).encode(text) == want
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "a")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == want
    # Re-exporting a loaded checkpoint without a tokenizer carries the source's tokenizer files along.
    save_pretrained(load_pretrained(tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (
        tmp_path / "a" / "tokenizer.json"
    ).read_bytes()


def test_rope_base_and_layout_come_from_config_json():
    from engine.models.args import RopeScaling
    from engine.models.hf_config import args_from_config

    base = COMMON | dict(num_key_value_heads=2, rms_norm_eps=1e-6)
    qwen, fmt = args_from_config(base | dict(model_type="qwen2", rope_theta=123456.0))
    assert fmt == "qwen2" and (qwen.rope_theta, qwen.rotary_dim, qwen.rope_layout) == (123456.0, 16, "half")
    # transformers >= 5 keeps rope values under rope_parameters; GLM rotates half of each head by default.
    glm, _ = args_from_config(base | dict(model_type="glm", head_dim=32, rope_parameters={"rope_theta": 7e5}))
    assert (glm.rope_theta, glm.rotary_dim, glm.rope_layout) == (7e5, 16, "interleaved")
    glm4, _ = args_from_config(base | dict(model_type="glm4", head_dim=32, partial_rotary_factor=0.25))
    assert glm4.rotary_dim == 8 and glm4.rope_theta == 10000.0
    chatglm = dict(model_type="chatglm", padded_vocab_size=96, hidden_size=64, ffn_hidden_size=96)
    chatglm |= dict(num_layers=2, num_attention_heads=4, kv_channels=16, layernorm_epsilon=1e-5)
    chatglm |= dict(multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True)
    args, fmt = args_from_config(chatglm | dict(rope_ratio=500))
    assert fmt == "chatglm" and args.rope_theta == 5e6 and args.rotary_dim == 8 and args.num_kv_heads == 2
    assert args_from_config(chatglm)[0].rope_theta == 1e4  # no rope_ratio: base 10000
    # Legacy rope_scaling spellings as the public configs write them (Qwen2 past 32k, Llama 3.1).
    yarn, _ = args_from_config(base | dict(model_type="qwen2", max_position_embeddings=32768, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}))  # fmt: skip
    assert yarn.rope_scaling == RopeScaling("yarn", 4.0, 32768)
    llama, fmt = args_from_config(base | dict(model_type="llama", max_position_embeddings=131072, rope_scaling={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        "rope_type": "llama3"}))  # fmt: skip
    assert fmt == "llama" and not llama.qkv_bias and llama.rope_scaling == RopeScaling("llama3", 8.0, 8192)
    dyn, _ = args_from_config(
        base | dict(model_type="qwen2", rope_scaling={"type": "dynamic", "factor": 2.0})
    )
    assert dyn.rope_scaling.rope_type == "dynamic" and dyn.rope_scaling.factor == 2.0
    # Unknown types and keys stay errors naming the key (never a rotary silently computed wrongly).
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type 'longrope' is not supported"):
        args_from_config(base | dict(model_type="qwen2", rope_scaling={"type": "longrope", "factor": 4.0}))
    with pytest.raises(ValueError, match=r"rope_parameters.rope_type 'linear' is not supported"):
        args_from_config(
            base | dict(model_type="llama", rope_parameters={"rope_type": "linear", "factor": 2.0})
        )
    with pytest.raises(ValueError, match=r"rope_scaling.short_factor is not supported"):
        args_from_config(base | dict(model_type="qwen2", rope_scaling={
            "type": "yarn", "factor": 4.0, "short_factor": [1.0]}))  # fmt: skip
    with pytest.raises(ValueError, match=r"rope_scaling.factor is missing"):
        args_from_config(base | dict(model_type="llama", rope_scaling={"rope_type": "dynamic"}))
    with pytest.raises(ValueError, match="rmsnorm=False is not supported"):
        args_from_config(chatglm | dict(rmsnorm=False))
