"""Parity with HuggingFace `DeepseekV3ForCausalLM` (transformers 5.24, torch CPU, fp32).

A tiny random V3 (spec section 6.2) with every norm weight and correction bias randomised
and group-limited routing that changes expert choices is imported through each naming
(save_pretrained, in-memory fused + MTP, unfused + FP8 + sharded), exported back, and
trained for a few steps.
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import moejax  # noqa: E402
from moejax.interop import hf  # noqa: E402
from moejax.interop.safetensors_io import dequantize_fp8  # noqa: E402

pytestmark = pytest.mark.hf
TOL = 1e-4
_APPLY: dict = {}


def tiny_hf_config():
    return transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, first_k_dense_replace=1, max_position_embeddings=2560,
        rope_interleave=True, num_mtp_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def _randomise(module, seed):
    """Random matrices (std 0.1), norm weights 1 + 0.3 N(0,1), correction biases 0.1 N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if p.ndim == 1 else 0.1 * noise)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _apply(config, variables, ids, with_mtp=False):
    m = moejax.model_config(config.model)
    if (m, with_mtp) not in _APPLY:
        model = moejax.Transformer(m)
        _APPLY[m, with_mtp] = jax.jit(lambda v, t: model.apply(v, t, with_mtp=with_mtp))
    logits, aux = _APPLY[m, with_mtp](variables, jnp.asarray(ids))
    return np.asarray(logits), aux


def _report(name, a, b):
    d = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    print(f"{name}: max |dlogits| = {d:.2e}")
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """HF model, its save_pretrained folder, input ids [2, 64] and reference logits."""
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(tiny_hf_config()).eval()
    _randomise(model, 1)
    folder = tmp_path_factory.mktemp("hf") / "saved"
    model.save_pretrained(folder)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    return model, folder, ids, logits


def test_group_limited_routing_changes_expert_choices(tiny):
    model, _, ids, _ = tiny
    inputs = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: inputs.append((m, a[0])))
             for layer in model.model.layers[1:]]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    changed = 0
    for gate, x in inputs:
        s = torch.sigmoid(x.reshape(-1, 64) @ gate.weight.T) + gate.e_score_correction_bias
        limited = gate(x)[2].sort(-1).values
        free = s.topk(2, -1).indices.sort(-1).values
        changed += int((limited != free).any(-1).sum())
    print(f"group limits changed the expert set of {changed} of {3 * 128} token-layers")
    assert changed > 10


def test_import_of_save_pretrained_matches_hf(tiny):
    _, folder, ids, ref = tiny
    config, variables = hf.load(folder)
    assert config.model.moe.capacity_factor == 0.0 and config.model.mtp.depth == 0
    logits, _ = _apply(config, variables, ids.numpy())
    assert _report("save_pretrained import", logits, ref) <= TOL
    bias = np.asarray(variables["moe_bias"]["bias"][1])
    np.testing.assert_array_equal(bias, tiny[0].model.layers[2].mlp.gate.e_score_correction_bias)


def test_import_of_a_plain_query_half_rope_variant_matches_hf(tmp_path):
    """q_lora_rank=None (q_proj), rope_interleave=False, no renormalisation, 2 groups keep 1,
    and YaRN with mscale but no mscale_all_dim (HF then scales cos/sin by get_mscale(f))."""
    cfg = tiny_hf_config()
    cfg.q_lora_rank, cfg.rope_interleave, cfg.norm_topk_prob = None, False, False
    cfg.n_group, cfg.topk_group = 2, 1
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                           "original_max_position_embeddings": 32, "beta_fast": 32,
                           "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.0}
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    _randomise(model, 5)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    config, variables = hf.load(tmp_path)
    assert config.model.mla.q_lora_rank == 0 and config.model.rope.style == "half"
    logits, _ = _apply(config, variables, ids.numpy())
    assert _report("plain-query variant import", logits, ref) <= TOL


def _mtp_modules(hf_config, seed):
    """Random MTP weights (V3 §2.2) as HF modules: norms, eh_proj and a MoE layer."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod
    d = hf_config.hidden_size
    mtp = torch.nn.ModuleDict({
        "enorm": mod.DeepseekV3RMSNorm(d, hf_config.rms_norm_eps),
        "hnorm": mod.DeepseekV3RMSNorm(d, hf_config.rms_norm_eps),
        "eh_proj": torch.nn.Linear(2 * d, d, bias=False),
        "block": mod.DeepseekV3DecoderLayer(hf_config, hf_config.first_k_dense_replace),
        "norm": mod.DeepseekV3RMSNorm(d, hf_config.rms_norm_eps)}).eval()
    _randomise(mtp, seed)
    return mtp


def test_import_of_in_memory_names_with_mtp_matches_hf_and_the_mtp_formula(tiny, tmp_path):
    model, folder, ids, ref = tiny
    mtp = _mtp_modules(model.config, 2)
    n = model.config.num_hidden_layers
    tensors = dict(model.state_dict())  # fused experts: mlp.experts.gate_up_proj
    tensors.update({f"model.layers.{n}.{k}": v for k, v in mtp["block"].state_dict().items()})
    for ours, theirs in [("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                         ("norm", "shared_head.norm")]:
        tensors[f"model.layers.{n}.{theirs}.weight"] = mtp[ours].weight
    tensors[f"model.layers.{n}.embed_tokens.weight"] = model.model.embed_tokens.weight
    tensors[f"model.layers.{n}.shared_head.head.weight"] = model.lm_head.weight
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()},
              tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    config, variables = hf.load(tmp_path)
    assert config.model.mtp.depth == 1
    logits, aux = _apply(config, variables, ids.numpy(), with_mtp=True)
    assert _report("in-memory names import", logits, ref) <= TOL
    # V3 MTP in torch: x = eh_proj([enorm(emb(t+1)); hnorm(h_t)]), layer, norm, head.
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1][:, :-1]  # final-normed
        emb = model.model.embed_tokens(ids[:, 1:])
        x = mtp["eh_proj"](torch.cat([mtp["enorm"](emb), mtp["hnorm"](h)], -1))
        length = x.shape[1]
        pos = torch.arange(length)[None]
        mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
        x = mtp["block"](x, attention_mask=mask[None, None], position_ids=pos,
                         position_embeddings=model.model.rotary_emb(x, pos))
        mtp_ref = model.lm_head(mtp["norm"](x)).numpy()
    assert _report("MTP vs formula", np.asarray(aux["mtp_logits"])[:, :-1], mtp_ref) <= TOL


def _fp8(w, block):
    """(e4m3 q, fp32 scale_inv) with one scale per block, amax -> 448."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.zeros(rows, cols)
    q = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max() / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (
                tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_dequantisation_of_a_hand_built_fp8_matrix():
    q = torch.tensor(np.arange(130 * 260).reshape(130, 260) % 17 - 8.0,
                     dtype=torch.float32).to(torch.float8_e4m3fn)
    scale = torch.tensor([[0.5, 2.0, 4.0], [8.0, 0.25, 1.0]])  # [ceil(130/128), ceil(260/128)]
    out = dequantize_fp8(q.view(torch.uint8).numpy().view(jnp.float8_e4m3fn), scale.numpy())
    expected = np.empty((130, 260), np.float32)
    for i in range(130):
        for j in range(260):
            expected[i, j] = float(q[i, j].float()) * float(scale[i // 128, j // 128])
    np.testing.assert_array_equal(out, expected)


def test_import_of_unfused_sharded_fp8_names_matches_hf(tiny, tmp_path):
    model, folder, ids, _ = tiny
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            f = value.shape[1] // 2
            for e in range(value.shape[0]):
                tensors[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = value[e, :f]
                tensors[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = value[e, f:]
        elif name.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                tensors[name.replace("down_proj", f"{e}.down_proj.weight")] = value[e]
        else:
            tensors[name] = value
    target = "model.layers.1.self_attn.q_b_proj.weight"  # [96, 48]: 3 x 2 ragged blocks of 32
    q, scale = _fp8(tensors[target], 32)
    tensors[target], tensors[target + "_scale_inv"] = q, scale
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, tmp_path / file)
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    hf_cfg = json.loads((folder / "config.json").read_text())
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32]}
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    config, variables = hf.load(tmp_path)
    dequantised = q.float() * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)[:96, :48]
    reference = transformers.DeepseekV3ForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.model.layers[1].self_attn.q_b_proj.weight.copy_(dequantised)
        ref = reference(ids).logits.numpy()
    logits, _ = _apply(config, variables, ids.numpy())
    assert _report("unfused + FP8 + sharded import", logits, ref) <= TOL


def test_bad_checkpoints_get_clear_errors(tiny, tmp_path):
    _, folder, _, _ = tiny
    shutil.copytree(folder, tmp_path / "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        hf.load(tmp_path / "llama")
    shutil.copytree(folder, tmp_path / "extra")
    save_file({"model.layers.0.mystery.weight": torch.zeros(2)},
              tmp_path / "extra" / "zzz.safetensors")
    with pytest.raises(ValueError, match="mystery"):
        hf.load(tmp_path / "extra")


def test_export_reloads_in_transformers_with_identical_logits(tiny, tmp_path):
    _, folder, ids, ref = tiny
    config, variables = hf.load(folder)
    hf.save(config, variables, tmp_path / "export", max_shard_bytes=1 << 20)
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()  # sharded
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        logits = reloaded(ids).logits.numpy()
    assert _report("export -> from_pretrained", logits, ref) == 0.0


@pytest.mark.slow  # a train-step compile; the import itself is checked against HF above
def test_training_steps_from_the_imported_model_lower_the_loss(tiny):
    _, folder, ids, _ = tiny
    config, variables = hf.load(folder)
    model = moejax.Transformer(moejax.model_config(config.model))
    tokens = jnp.asarray(ids.numpy())
    tx = optax.adamw(3e-3)

    def loss_fn(params):
        logits, aux = model.apply({**variables, "params": params}, tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return ce.mean() + aux["moe_loss"]

    @jax.jit
    def step(params, opt):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    params, losses = variables["params"], []
    opt = tx.init(params)
    for _ in range(5):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    print("training losses", " ".join(f"{x:.3f}" for x in losses))
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.slow
def test_cli_import_train_export_round_trip(tmp_path):
    """import -> the training loop resumes the step-0 checkpoint -> export -> HF loads it."""
    from moejax.config import load_config
    from moejax.interop.hf_cli import export_checkpoint, import_checkpoint
    from moejax.train import train_and_evaluate
    hf_cfg = tiny_hf_config()
    hf_cfg.vocab_size = 384  # the byte tokenizer of the default data section needs 259 ids
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    _randomise(model, 3)
    model.save_pretrained(tmp_path / "hf")
    config_file = import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "work"))
    cfg = load_config(str(config_file), [
        "train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1",
        "train.log_every=1", "optimizer.warmup_steps=1", "optimizer.learning_rate=1e-3"])
    assert train_and_evaluate(cfg, tmp_path / "work")["step"] == 2
    assert export_checkpoint(str(tmp_path / "work"), str(tmp_path / "out")) == 2
    trained = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    before, after = model.state_dict(), trained.state_dict()
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < moved < 0.05  # trained on from the imported weights (they have std 0.1)
