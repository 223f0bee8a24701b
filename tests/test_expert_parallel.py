"""Expert parallelism under shard_map against the dense oracle and the GSPMD path.

Meshes use the 8 fake CPU devices of conftest.py. The "ragged" transport runs with its
all-gather emulation of ragged_all_to_all (XLA:CPU cannot compile the real collective);
the native variant is only traced and lowered here.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from jax.sharding import PartitionSpec

import moejax.model.moe.parallel.shard_map as ep
from moejax.config import MeshConfig, MoEConfig, resolve
from moejax.model.moe.capacity import DISPATCH
from moejax.model.moe.execution import resolve_execution
from moejax.model.moe.layer import MoE
from moejax.model.moe.parallel.ragged_exchange import (ExchangePlan, emulated_ragged_all_to_all,
                                          exchange_plans)
from moejax.model.moe.router import select_experts
from moejax.sharding import active_mesh, make_mesh, use_mesh

G, S, D, E, F, T = 8, 8, 8, 8, 4, 2
MESHES = {"data4_expert2": (4, 2, 1), "data2_expert4": (2, 4, 1), "expert8": (1, 8, 1),
          "data2_expert2_tensor2": (2, 2, 2)}


def _problem(seed: int = 0, skew: float = 0.0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (G, S, D))
    logits = jax.random.normal(k[1], (G, S, E)) + skew * jnp.arange(E) / E
    idx, w = select_experts(jax.nn.softmax(logits, -1), jnp.zeros(E), T)
    weights = tuple(jax.random.normal(k[i], shape) * 0.3 for i, shape in
                    zip(range(2, 5), [(E, D, F), (E, D, F), (E, F, D)]))
    mask = jnp.ones((G, S), bool).at[:, -2:].set(False)  # padding at every row's end
    return x, idx, w, mask, weights


def _value_and_grads(fn, x, idx, w, mask, weights, cf: float, limit: float):
    def loss(x, w, weights):
        out, dropped = fn(x, idx, w, mask, weights, cf, limit)
        return jnp.sum(out * jnp.cos(out)), (out, dropped)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, weights)


def _sharded(transport: str, sizes: tuple[int, int, int], cf: float = 0.0,
             limit: float = 0.5, problem: tuple = (), local: str = "index"):
    data, expert, tensor = sizes
    mesh = make_mesh(MeshConfig(data=data, expert=expert, tensor=tensor))
    fn = functools.partial(ep.expert_parallel_dispatch, mesh=mesh, transport=transport,
                           local=local)
    with use_mesh(mesh):
        return _value_and_grads(fn, *(problem or _problem()), cf, limit)


def _assert_matches(got, ref):
    (_, (out, dropped)), grads = got
    (_, (ref_out, _)), ref_grads = ref
    assert int(dropped) == 0
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    assert float(jnp.abs(ref_out).max()) > 0.1  # not a comparison between zeros
    np.testing.assert_array_equal(out[:, -2:], 0.0)  # padding tokens get nothing
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.fixture(scope="module")
def oracle():
    """Dense oracle with the clamp on (limit 0.5 clips many of these pre-activations)."""
    return _value_and_grads(DISPATCH["dense"], *_problem(), 0.0, 0.5)


# One mesh where one suffices: expert8 (all experts split) and data2_expert2_tensor2 (every
# axis at once) run by default; the two data x expert splits are slow (subsumed by those).
SLOW = pytest.mark.slow


@pytest.mark.parametrize("mesh", [pytest.param("data4_expert2", marks=SLOW),
                                  pytest.param("data2_expert4", marks=SLOW),
                                  "expert8", "data2_expert2_tensor2"])
def test_all_gather_matches_dense_oracle_values_and_grads(mesh, oracle):
    _assert_matches(_sharded("all_gather", MESHES[mesh]), oracle)


@pytest.mark.parametrize("mesh", [pytest.param("data2_expert4", marks=SLOW), "expert8",
                                  "data2_expert2_tensor2"])
def test_all_gather_dropless_matches_dense_oracle_values_and_grads(mesh, oracle):
    # cf = 1.0 would drop pairs in index dispatch; the dropless local computation never does
    _assert_matches(_sharded("all_gather", MESHES[mesh], cf=1.0, local="dropless"), oracle)


@pytest.mark.parametrize("mesh", [pytest.param("data4_expert2", marks=SLOW), "expert8",
                                  pytest.param("data2_expert2_tensor2", marks=SLOW)])
def test_ragged_emulated_matches_dense_oracle_values_and_grads(mesh, oracle):
    _assert_matches(_sharded("ragged", MESHES[mesh]), oracle)


def test_all_gather_drops_exactly_the_pairs_index_dispatch_drops():
    problem = _problem(seed=1, skew=4.0)  # skewed routing: high experts overflow at cf=1
    (_, (out, dropped)), grads = _sharded("all_gather", (2, 4, 1), 1.0, 0.0, problem)
    (_, (ref, ref_dropped)), ref_grads = _value_and_grads(DISPATCH["index"], *problem, 1.0, 0.0)
    assert int(dropped) == int(ref_dropped) > 0
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def _numpy_ragged_all_to_all(operands, outputs, plans):
    """The collective as its docstring writes it, one slice per destination shard."""
    results = [o.copy() for o in outputs]
    for src, (op, plan) in enumerate(zip(operands, plans)):
        for dst in range(len(operands)):
            start, size = int(plan.input_offsets[dst]), int(plan.send_sizes[dst])
            at = int(plan.output_offsets[dst])
            assert size == int(plans[dst].recv_sizes[src])  # the sizes agree pairwise
            results[dst][at:at + size] = op[start:start + size]
    return results


@pytest.mark.parametrize("recv_rows", [None, 5])  # None: dropless (n * P); 5: overflow
def test_exchange_plans_route_every_pair_to_its_expert_and_back(recv_rows):
    n, e, pairs = 4, 8, 6
    rng = np.random.default_rng(0)
    eids = [np.sort(rng.integers(0, e + 1, pairs)) for _ in range(n)]  # e = padding
    counts = np.stack([np.bincount(x, minlength=e + 1)[:e] for x in eids])
    rows = recv_rows or n * pairs
    plans = [exchange_plans(jnp.asarray(counts), me, rows) for me in range(n)]
    received = _numpy_ragged_all_to_all(eids, [np.full(rows, -1) for _ in range(n)],
                                        [p[0] for p in plans])
    dropped = sum(int(p[2]) for p in plans)
    for me, got in enumerate(received):
        assert np.all((got == -1) | (got // (e // n) == me))  # only my experts arrive
    assert sum(int((got >= 0).sum()) for got in received) == int(counts.sum()) - dropped
    assert (dropped > 0) == (recv_rows is not None)
    back = _numpy_ragged_all_to_all(received, [np.full(pairs, -1) for _ in range(n)],
                                    [p[1] for p in plans])
    for sent, returned in zip(eids, back):
        arrived = returned >= 0
        np.testing.assert_array_equal(returned[arrived], sent[arrived])  # same places
    lost = sum(int(((r < 0) & (s < e)).sum()) for r, s in zip(back, eids))
    assert lost == dropped  # the real pairs that did not come back are the dropped ones


def test_emulated_ragged_all_to_all_reproduces_the_documented_example():
    mesh = make_mesh(MeshConfig(data=1, expert=2), devices=jax.devices()[:2])
    operand = jnp.asarray([[1, 2, 2], [3, 4, 0]], jnp.float32)
    plan = ExchangePlan(*(jnp.asarray(a, jnp.int32) for a in
                          ([[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]],
                           [[1, 1], [2, 1]])))
    spec = PartitionSpec("expert")
    fn = jax.shard_map(
        lambda op, out, *p: emulated_ragged_all_to_all(
            op[0], out[0], ExchangePlan(*(a[0] for a in p)), "expert")[None],
        mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)
    got = jax.jit(fn)(operand, jnp.zeros((2, 4)), *plan)
    np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_native_ragged_transport_traces_and_lowers_with_grads(monkeypatch):
    monkeypatch.setattr(ep, "_native_ragged", lambda mesh: True)
    x, idx, w, mask, weights = _problem()
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))

    def loss(x, w, weights):
        return ep.expert_parallel_dispatch(x, idx, w, mask, weights, 0.0, 0.5, mesh=mesh,
                                           transport="ragged")[0].sum()
    with use_mesh(mesh):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, weights).as_text()
    assert hlo.count("ragged_all_to_all") >= 3  # rows, expert ids, results back (+ grads)


def _moe_apply(cfg: MoEConfig, mesh, x, mask):
    moe = MoE(cfg, init_std=0.2)  # large enough that the outputs are far from zero
    with use_mesh(mesh):
        params = jax.jit(moe.init)(jax.random.key(0), x, jnp.zeros(E), mask)

        def loss(params, x):
            y, stats = moe.apply(params, x, jnp.zeros(E), mask)
            return jnp.sum(y * jnp.cos(y)), (y, stats["dropped_fraction"])
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


def test_moe_module_shard_map_equals_gspmd():
    x = jax.random.normal(jax.random.key(3), (4, 16, D))
    mask = jnp.ones((4, 16), bool).at[1, -5:].set(False)
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    base = dict(num_experts=E, top_k=T, expert_hidden=F, num_shared_experts=1,
                capacity_factor=0.0, group_size=8)
    runs = {name: _moe_apply(MoEConfig(**base, **kw), mesh, x, mask) for name, kw in {
        "shard_map": dict(expert_parallel="shard_map", expert_transport="all_gather"),
        "shard_map_dropless": dict(expert_parallel="shard_map", dispatch="dropless",
                                   expert_transport="all_gather"),
        "gspmd": dict(dispatch="index")}.items()}  # index == dense at cf=0: test_moe.py
    (_, (ref_y, _)), ref_grads = runs["gspmd"]
    assert float(jnp.abs(ref_y).max()) > 0.01
    for name in ("shard_map", "shard_map_dropless"):
        (_, (y, dropped)), grads = runs[name]
        assert float(dropped) == 0.0
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):  # router too
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _select(dispatch: str, expert_parallel: str = "auto", transport: str = "auto",
            backend: str = "auto"):
    mesh = active_mesh()
    return ep.select_dispatch(
        resolve_execution(dispatch, expert_parallel, transport, backend, mesh), mesh)


def test_without_a_mesh_the_layer_falls_back_to_its_dispatch():
    assert _select("index", "shard_map") is DISPATCH["index"]
    with use_mesh(make_mesh(MeshConfig(data=8))):
        assert _select("index", "gspmd") is DISPATCH["index"]
        assert _select("index", "auto") is DISPATCH["index"]
        assert _select("index", "shard_map").func is ep.expert_parallel_dispatch


def test_dropless_backend_reaches_the_dispatch():
    plain = _select("dropless", backend="loop")
    assert plain.func is DISPATCH["dropless"] and plain.keywords["backend"] == "loop"
    assert _select("dropless").keywords["backend"] == "bulk"  # "auto" on CPU
    with use_mesh(make_mesh(MeshConfig(data=8))):
        sharded = _select("dropless", backend="bulk")
        assert sharded.func is ep.expert_parallel_dispatch
        assert sharded.keywords["dropless_backend"] == "bulk"


def test_platform_choices_are_resolved_explicitly():
    """"auto" says what it picked; an explicit gspmd is honoured or refused, never
    overridden; ragged picked by "auto" on an accelerator comes with a warning."""
    mesh = make_mesh(MeshConfig(data=8))
    auto = resolve_execution("dropless", "auto", mesh=mesh)
    assert (auto.expert_parallel, auto.transport, auto.dropless_backend) == (
        "shard_map", "all_gather", "bulk")
    assert not auto.check_vma and auto.notes and not auto.warnings
    with pytest.raises(ValueError, match=r"model\.moe\.expert_parallel='gspmd'.*'shard_map'"):
        resolve_execution("dropless", "gspmd", mesh=mesh)
    assert resolve_execution("index", "gspmd", mesh=mesh).expert_parallel == "gspmd"
    one = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    assert resolve_execution("dropless", "gspmd", mesh=one).expert_parallel == "gspmd"
    gpu = resolve_execution("index", "shard_map", mesh=mesh, platform="gpu")
    assert gpu.transport == "ragged" and "expert_transport" in gpu.warnings[0]
    assert resolve_execution("index", "shard_map", "all_gather", mesh=mesh,
                             platform="gpu").warnings == ()
    assert resolve_execution("index", "shard_map", mesh=mesh).check_vma


@pytest.mark.parametrize("overrides,field", [
    (["model.moe.expert_parallel='manual'"], "model.moe.expert_parallel"),
    (["model.moe.expert_transport='nccl'"], "model.moe.expert_transport"),
    (["model.moe.expert_parallel='shard_map'", "model.moe.dispatch='einsum'"],
     "model.moe.dispatch"),
    (["model.moe.expert_parallel='shard_map'", "model.moe.dispatch='dense'"],
     "model.moe.dispatch"),
    (["model.moe.expert_parallel='shard_map'", "mesh.tensor=2", "model.moe.expert_hidden=33"],
     "model.moe.expert_hidden"),
    (["model.moe.expert_parallel='shard_map'", "mesh.expert=3"], "model.moe.num_experts"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        resolve(small_config(*overrides))


def test_expert_count_not_divisible_by_the_expert_axis_is_a_clear_error():
    mesh = make_mesh(MeshConfig(data=1, expert=8))
    x, idx, w, mask, _ = _problem()
    weights = (jnp.ones((4, D, F)),) * 2 + (jnp.ones((4, F, D)),)
    with use_mesh(mesh), pytest.raises(ValueError, match="divisible by mesh.expert=8"):
        ep.expert_parallel_dispatch(x, idx, w, mask, weights, 0.0, mesh=mesh)


def test_v4_moe_shard_map_matches_the_dense_oracle():
    from moejax.config.v4 import V4MoEConfig
    from moejax.model.v4.moe import V4MoE
    x = jax.random.normal(jax.random.key(4), (4, 8, D))
    tokens = jax.random.randint(jax.random.key(5), (4, 8), 0, 32)
    mask = jnp.ones((4, 8), bool).at[2, -3:].set(False)
    mesh = make_mesh(MeshConfig(data=2, expert=4))  # 4 groups: whole on the expert axis,
    runs = []  # so this also covers the no-gather branch (a psum instead of the scatter)
    for kw in (dict(dispatch="dense"), dict(dispatch="dropless", expert_parallel="shard_map",
                                            expert_transport="all_gather")):
        cfg = V4MoEConfig(num_experts=E, top_k=T, expert_hidden=F, swiglu_limit=0.5,
                          group_size=8, **kw)
        moe = V4MoE(cfg, is_hash=False, vocab_size=32, init_std=0.2)
        with use_mesh(mesh):
            params = jax.jit(moe.init)(jax.random.key(0), x, jnp.zeros(E), tokens, mask)
            fn = jax.value_and_grad(lambda p, x: jnp.sum(moe.apply(
                p, x, jnp.zeros(E), tokens, mask)[0] ** 2), argnums=(0, 1))
            runs.append(jax.jit(fn)(params, x))
    for a, b in zip(jax.tree.leaves(runs[1]), jax.tree.leaves(runs[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_v4_config_validation_names_the_field():
    from moejax.config.v4 import V4MoEConfig, validate_moe
    with pytest.raises(ValueError, match=r"model\.moe\.dispatch"):
        validate_moe(V4MoEConfig(expert_parallel="shard_map", dispatch="dense"), 4, "model.moe")
    with pytest.raises(ValueError, match=r"model\.moe\.expert_transport"):
        validate_moe(V4MoEConfig(expert_transport="mpi"), 4, "model.moe")
