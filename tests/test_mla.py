"""DeepSeek-V3 pieces: MLA (full vs cached decode, kernels), MTP wiring, configs, sizes."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

import moejax
from moejax.config import load_config
from moejax.train.loss import shifted_nll, target_mask
from moejax.model.transformer import DecoderBlock, Transformer

V3 = str(ROOT / "configs" / "deepseek_v3.py")


def v3_config(*overrides: str, variant: str = "tiny"):
    return load_config(f"{V3}:{variant}", ["model.moe.capacity_factor=0.0", *overrides])


def _init(cfg, tokens):
    model = Transformer(moejax.model_config(cfg.model))
    return model, jax.jit(lambda r, t: nn.unbox(model.init(r, t)))(jax.random.key(0), tokens)


def _tokens(b=2, length=24, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, 384)


@pytest.fixture(scope="module")
def tiny_v3():
    """(model, variables) of the tiny V3 (dropless), initialised once for this module."""
    return _init(v3_config(), _tokens())


# The plain-query variant is slow (its own model and decoder compile); its forward is
# checked against HF by test_hf_v3.py::test_import_of_a_plain_query_half_rope_variant_...
@pytest.mark.parametrize("plain_query", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mla_cached_decoding_equals_the_full_forward(plain_query, tiny_v3):
    tokens = _tokens()
    if plain_query:  # q_lora_rank = 0 (plain query projection), half-split rope pairs
        cfg = v3_config("model.mla.q_lora_rank=0", "model.rope.style='half'")
        model, v = _init(cfg, tokens)
    else:
        cfg, (model, v) = v3_config(), tiny_v3
    full, _ = jax.jit(model.apply)(v, tokens)
    decoder = Transformer(moejax.model_config(cfg.model), decode=True)
    prompt = 9
    positions = jnp.broadcast_to(jnp.arange(prompt), (2, prompt))
    apply = jax.jit(lambda v, t, p: decoder.apply(v, t, positions=p, mutable=["cache"]))
    (logits, _), state = apply(v, tokens[:, :prompt], positions)  # prefill: one program
    cache = jax.tree_util.tree_flatten_with_path(state["cache"])[0]
    assert {p[-1].key for p, _ in cache} == {"latent", "rope_key", "index"}  # latent only
    steps = [logits]
    for t in range(prompt, tokens.shape[1]):
        (logits, _), state = apply({**v, **state}, tokens[:, t:t + 1], jnp.full((2, 1), t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def _mla_loss_and_grads(variables, impl: str):
    tokens = _tokens()
    model = Transformer(moejax.model_config(v3_config(f"model.attention_impl='{impl}'").model))

    def loss(params):
        return jnp.mean(model.apply({**variables, "params": params}, tokens)[0] ** 2)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.fixture(scope="module")
def mla_reference_grads(tiny_v3):
    """Loss and gradients of the tiny V3 with the reference attention (computed once)."""
    return _mla_loss_and_grads(tiny_v3[1], "reference")


# "xla" is slow: the einsum kernel is the one with its own VJP; both run the same MLA math.
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "einsum"])
def test_mla_attention_impls_equal_reference_in_values_and_gradients(tiny_v3,
                                                                     mla_reference_grads,
                                                                     impl):
    got = _mla_loss_and_grads(tiny_v3[1], impl)
    want = mla_reference_grads
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7),
                 got[1], want[1])


def test_mla_packed_documents_do_not_see_each_other(tiny_v3):
    tokens = _tokens(1, 32)
    seg = jnp.asarray([[1] * 12 + [2] * 20])
    pos = jnp.asarray([list(range(12)) + list(range(20))])
    model, v = tiny_v3
    packed, _ = jax.jit(model.apply)(v, tokens, seg, pos)
    alone, _ = jax.jit(model.apply)(v, tokens[:, 12:])
    np.testing.assert_allclose(packed[:, 12:], alone, atol=2e-5)


def _rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def test_mtp_logits_follow_the_formula_and_are_only_computed_when_asked(tiny_v3):
    m = moejax.model_config(v3_config().model)
    tokens = _tokens()
    model, v = tiny_v3
    _, plain = jax.eval_shape(model.apply, v, tokens)
    assert "mtp_logits" not in plain
    jaxpr = str(jax.make_jaxpr(lambda t: model.apply(v, t))(tokens))
    assert jaxpr.count("dot_general") < str(jax.make_jaxpr(
        lambda t: model.apply(v, t, with_mtp=True))(tokens)).count("dot_general")
    _, aux = jax.jit(model.apply, static_argnames="with_mtp")(v, tokens, with_mtp=True)
    # Reference: h = final-normed hidden state, x = eh_proj [enorm(emb(t+1)); hnorm(h_t)].
    p, mtp = v["params"], v["params"]["mtp"]
    _, inter = jax.jit(lambda v, t: model.apply(
        v, t, capture_intermediates=lambda mdl, _: mdl.name == "final_norm",
        mutable=["intermediates"]))(v, tokens)
    h = np.asarray(inter["intermediates"]["final_norm"]["__call__"][0])
    emb = np.asarray(p["embed"]["embedding"])[np.asarray(tokens[:, 1:])]
    both = np.concatenate([_rms(emb, mtp["enorm"]["scale"]),
                           _rms(h[:, :-1], mtp["hnorm"]["scale"])], -1)
    x = jnp.asarray(both @ np.asarray(mtp["eh_proj"]))
    seg = jnp.ones(x.shape[:2], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    x, _ = jax.jit(DecoderBlock(m, True).apply)({"params": mtp["block"]}, x,
                                                v["moe_bias"]["mtp_bias"][0], seg, pos)
    ref = _rms(np.asarray(x), mtp["norm"]["scale"]) @ np.asarray(p["head"]["kernel"])
    np.testing.assert_allclose(aux["mtp_logits"][:, :-1], ref, atol=2e-5)
    assert aux["mtp_expert_load"].shape == (1, m.moe.num_experts)


def test_mtp_is_causal_and_its_loss_counts_same_document_targets(tiny_v3):
    tokens = _tokens()
    model, v = tiny_v3
    apply = jax.jit(model.apply, static_argnames="with_mtp")
    _, a = apply(v, tokens, with_mtp=True)
    t = 12  # position t sees tokens <= t+1: changing token t+2 leaves positions <= t alone
    _, b = apply(v, tokens.at[:, t + 2].set((tokens[:, t + 2] + 1) % 384), with_mtp=True)
    np.testing.assert_array_equal(a["mtp_logits"][:, :t + 1], b["mtp_logits"][:, :t + 1])
    assert float(jnp.abs(a["mtp_logits"][:, t + 1] - b["mtp_logits"][:, t + 1]).max()) > 1e-5
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
    np.testing.assert_array_equal(target_mask(seg, 2), [[1, 0, 0, 1, 1, 0]])
    nll, count = shifted_nll(a["mtp_logits"], tokens, jnp.ones_like(tokens), 2)
    assert float(count) == tokens.shape[0] * (tokens.shape[1] - 2) and float(nll) > 0


def test_671b_config_builds_abstractly_with_the_published_parameter_count():
    cfg = load_config(f"{V3}:671b")
    m = moejax.model_config(cfg.model)
    shapes = nn.unbox(jax.eval_shape(Transformer(m).init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)))
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    mtp = size(shapes["params"]["mtp"]) + size(shapes["moe_bias"]["mtp_bias"])
    total = size(shapes)  # parameters + e_score_correction_bias, as in spec section 5
    d, v, h = 7168, 129280, 128  # spec section 5.2
    attn = d * 1536 + 1536 + 1536 * h * 192 + d * 576 + 512 + 512 * h * 256 + h * 128 * d
    moe = 257 * 3 * d * 2048 + 256 * d + 256
    main = 61 * (attn + 2 * d) + 3 * 3 * d * 18432 + 58 * moe + 2 * v * d + d
    assert total - mtp == main == 671_026_419_200  # "671B"
    assert total == main + attn + 2 * d + moe + 2 * d + 2 * d * d + d == 682_636_487_424


@pytest.mark.parametrize("override,field", [
    ("model.mla.qk_rope_head_dim=7", "model.mla.qk_rope_head_dim"),
    ("model.mla.kv_lora_rank=0", "model.mla.kv_lora_rank"),
    ("model.mtp.depth=2", "model.mtp.depth"),
    ("model.attention_type='mha'", "model.attention_type")])
def test_bad_v3_fields_are_named(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        v3_config(override)


def test_hf_export_then_import_restores_every_variable(tiny_v3, tmp_path):
    pytest.importorskip("safetensors")
    from moejax.interop import hf
    model, v = tiny_v3
    hf.save(model.cfg, v, tmp_path, max_shard_bytes=1 << 18)
    config, loaded = hf.load(tmp_path)
    assert moejax.model_config(config.model).mtp.depth == 1
    flat = dict(jax.tree_util.tree_flatten_with_path(v)[0])
    restored = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    assert flat.keys() == restored.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(restored[path], value, err_msg=str(path))
