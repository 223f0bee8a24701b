"""moejax.aot: topology names, the HLO collective counter, and compiles for TPU topologies
(libtpu; skipped where it is not installed) checked against the planner's memory."""

import pytest
from conftest import ROOT, SMALL_MODEL

from moejax.aot import required_bytes
from moejax.config import load_config
from moejax.hlo_stats import collective_stats, shape_bytes
from moejax.topology import GIB, parse_topology

V4_TINY = str(ROOT / "configs/deepseek_v4.py") + ":tiny"
# Short batches keep each XLA:TPU compile to seconds; the mesh spreads fsdp over the slice.
SHORT = ["train.batch_size=8", "train.seq_len=64", "mesh.data=1", "mesh.fsdp=-1"]
# DeepSeek-V4's blocks at small dims: a hash-routed CSA layer, a learned-routing HCA layer
# (both with the sliding window), mHC. No MTP layer (a third block, a quarter of the compile;
# its parameters are counted by the same abstract state) and 32 positions (4 HCA entries).
SMALL_V4 = ["model.num_layers=2", "model.attention.layer_types=('csa','hca')",
            "model.moe.num_hash_layers=1", "model.mtp.depth=0", "model.max_seq_len=32",
            "train.seq_len=32"]


@pytest.mark.parametrize("name, generation, grid", [
    ("v5p-8", "v5p", (2, 2, 1)), ("v5p-512", "v5p", (4, 8, 8)),
    ("v5p-768", "v5p", (4, 8, 12)), ("v5p-1024", "v5p", (8, 8, 8)),
    ("v5p-2048", "v5p", (8, 8, 16)), ("v5p-9216", "v5p", (12, 16, 24)),
    ("v4-8", "v4", (2, 2, 1)), ("v4-4096", "v4", (8, 16, 16)),
    ("v5e-16", "v5e", (4, 4)), ("v6e-256", "v6e", (16, 16)),
    ("v5p:8x8x4", "v5p", (8, 8, 4)), ("v5litepod-4", "v5e", (2, 2)),
])
def test_topology_names_give_the_provisioned_chip_grids(name, generation, grid):
    topology = parse_topology(name)
    assert (topology.generation, topology.grid) == (generation, grid)


@pytest.mark.parametrize("name, field", [
    ("v5p-12", "multiple of 64"), ("v5p-7", "even"), ("v5e-12", "slices have"),
    ("v7-8", "unknown"), ("v5p:4x4", "3 sides"), ("tpu", "product name"),
])
def test_bad_topology_names_say_what_is_allowed(name, field):
    with pytest.raises(ValueError, match=field):
        parse_topology(name)


# A scanned step in miniature: ENTRY runs a while loop of 5 trips (bound in the condition,
# start 1 in the init tuple, so 4 trips); its body holds an all-gather, an async all-reduce
# pair, a reduce-scatter and an inner loop whose trip count (3) is in the backend config.
HLO = """HloModule jit_step, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%inner_body (p: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[4,256]{1,0} get-tuple-element(%p), index=1
  %cp = bf16[4,256]{1,0:T(8,128)(2,1)} collective-permute(%x), channel_id=3, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], bf16[4,256]{1,0}) tuple(%i, %cp)
}

%inner_cond (p: (s32[], bf16[4,256])) -> pred[] {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (param: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %param = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) parameter(0)
  %iter = s32[]{:T(128)} get-tuple-element(%param), index=0
  %x = f32[8,128]{1,0:T(8,128)} get-tuple-element(%param), index=1
  %ag = f32[32,128]{1,0:T(8,128)} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ar-start = f32[32,128]{1,0} all-reduce-start(%ag), channel_id=2, to_apply=%add
  %ar-done = f32[32,128]{1,0} all-reduce-done(%ar-start)
  %rs = f32[8,128]{1,0} reduce-scatter(%ar-done), channel_id=4, dimensions={0}, to_apply=%add
  %zero = s32[] constant(0)
  %y = bf16[4,256]{1,0} constant({...})
  %init = (s32[], bf16[4,256]{1,0}) tuple(%zero, %y)
  %inner = (s32[], bf16[4,256]{1,0}) while(%init), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%iter, %one)
  ROOT %out = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) tuple(%next, %rs)
}

%cond (param.1: (s32[], f32[8,128])) -> pred[] {
  %param.1 = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) parameter(0)
  %limit = s32[]{:T(128)} constant(5)
  %counter = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%counter, %limit), direction=LT
}

ENTRY %main (arg: f32[8,128]) -> f32[8,128] {
  %arg = f32[8,128]{1,0:T(8,128)} parameter(0)
  %start = s32[]{:T(128)} constant(1)
  %tuple = (s32[]{:T(128)}, /*index=1*/f32[8,128]{1,0:T(8,128)}) tuple(%start, %arg)
  %loop = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) while(%tuple), condition=%cond, body=%body
  %res = f32[8,128]{1,0} get-tuple-element(%loop), index=1
  ROOT %final = f32[8,128]{1,0} all-reduce(%res), channel_id=5, to_apply=%add
}
"""


def test_collective_counter_multiplies_loop_bodies_by_their_trip_counts():
    stats = collective_stats(HLO)
    trips, inner = 4, 3
    assert stats.counts == {"all-gather": trips, "all-reduce": trips + 1,
                            "reduce-scatter": trips, "collective-permute": trips * inner}
    assert stats.bytes == {
        "all-gather": trips * 32 * 128 * 4,  # the gathered result
        "all-reduce": trips * 32 * 128 * 4 + 8 * 128 * 4,  # async pair counted once
        "reduce-scatter": trips * 32 * 128 * 4,  # the operand it reduces
        "collective-permute": trips * inner * 4 * 256 * 2}
    assert stats.unknown_trip_counts == 0


REDUCE_SCATTER_AS_ALL_REDUCE = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%all-reduce-scatter.1 (input: f32[4,128,256]) -> f32[4,64,256] {
  %input = f32[4,128,256]{2,1,0:T(8,128)} parameter(0)
  %ar = f32[4,128,256]{2,1,0:T(8,128)} all-reduce(%input), channel_id=1, replica_groups={{0,2},{1,3}}, to_apply=%add
  %zero = u32[] constant(0)
  %offset = u32[] constant(64)
  ROOT %slice = f32[4,64,256]{2,1,0:T(8,128)} dynamic-slice(%ar, %zero, %offset, %zero), dynamic_slice_sizes={4,64,256}
}

ENTRY %main (g: f32[4,128,256], h: f32[8]) -> (f32[4,64,256], f32[8]) {
  %g = f32[4,128,256]{2,1,0} parameter(0)
  %h = f32[8]{0} parameter(1)
  %rs = f32[4,64,256]{2,1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %sum = f32[8]{0} all-reduce(%h), channel_id=2, to_apply=%add
  ROOT %out = (f32[4,64,256]{2,1,0}, f32[8]{0}) tuple(%rs, %sum)
}
"""


def test_xla_tpu_reduce_scatter_written_as_a_sliced_all_reduce_counts_as_one():
    stats = collective_stats(REDUCE_SCATTER_AS_ALL_REDUCE)
    assert stats.counts == {"reduce-scatter": 1, "all-reduce": 1}
    assert stats.bytes == {"reduce-scatter": 4 * 128 * 256 * 4, "all-reduce": 8 * 4}


def test_a_data_dependent_loop_counts_once_and_is_reported():
    hlo = HLO.replace('backend_config={"known_trip_count":{"n":"3"}}', "")
    stats = collective_stats(hlo)
    assert stats.counts["collective-permute"] == 4 and stats.unknown_trip_counts == 1


def test_shape_bytes_ignores_layouts_and_sums_tuples():
    assert shape_bytes("bf16[4,256]{1,0:T(8,128)(2,1)S(1)}") == 2048
    assert shape_bytes("(s32[]{:T(128)}, f32[8,128]{1,0}, pred[3])") == 4 + 4096 + 3


@pytest.mark.parametrize("message, gib", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (200.00G) exceeds available HBM (95.74G).", 200.0),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. HLO temporaries (213.36G) "
     "exceed available HBM (95.74G)", 213.36),
])
def test_refusals_give_the_bytes_asked_for(message, gib):
    assert required_bytes(message) == int(gib * GIB)


# ------------------------------------------------------------------ compiles (libtpu)

# A persistent compilation cache (conftest.py's) cannot hand a compile-only TPU executable
# back (no TPU client to load it into); JAX warns and compiles.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")


def _compile_and_plan(config, topology="v5p-8", num_slices=1):
    pytest.importorskip("libtpu")
    from moejax.aot import compile_train_step
    from moejax.plan_memory import abstract_setup, state_bytes
    result = compile_train_step(config, topology, num_slices)
    assert result.error is None, result.error
    planned = state_bytes(abstract_setup(config, result.mesh)[1], tiled=True)
    return result, planned["params"] + planned["optimizer"] + planned["other_state"]


def _check(result, planned, chips):
    assert result.chips == chips and result.fits
    assert result.temp_bytes_per_chip > 0 and result.code_bytes_per_chip > 0
    assert result.plan_flops_per_step > 0 and sum(result.collective_bytes.values()) > 0
    # arguments = train state + this chip's rows of the batch (and the seed key)
    assert result.state_bytes_per_chip == pytest.approx(planned, rel=0.05)


@pytest.mark.slow  # the two-slice test compiles the same tiny step on 2 x v5p-8
def test_tiny_compiles_for_v5p_8_and_its_state_matches_the_planner():
    config = load_config(str(ROOT / "configs/tiny.py"), [*SMALL_MODEL, *SHORT])
    result, planned = _compile_and_plan(config)
    assert result.mesh == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    _check(result, planned, chips=4)


def test_a_two_layer_v4_model_compiles_for_v5p_8_and_its_state_matches_the_planner():
    config = load_config(V4_TINY, [*SHORT, *SMALL_V4])
    result, planned = _compile_and_plan(config)
    _check(result, planned, chips=4)


def test_tiny_compiles_for_two_slices_of_v5p_8():
    config = load_config(str(ROOT / "configs/tiny.py"), [*SMALL_MODEL, *SHORT,
                                                          "mesh.dcn_data=2"])
    result, planned = _compile_and_plan(config, num_slices=2)
    assert result.mesh == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}  # fsdp in a slice
    _check(result, planned, chips=8)


def test_a_mesh_axis_that_splits_a_physical_axis_still_gets_a_grid(caplog):
    """expert 32 x fsdp 32 on v5p-2048 (8 x 8 x 16 chips): no product of whole sides gives
    32, so the grid splits one (with a warning) instead of failing."""
    pytest.importorskip("libtpu")
    from moejax.sharding import ici_device_grid
    from moejax.topology import parse_topology, topology_devices
    devices = topology_devices(parse_topology("v5p-2048"))
    grid = ici_device_grid((1, 32, 32, 1), devices)
    assert grid.shape == (1, 32, 32, 1) and len({d.id for d in grid.flat}) == 1024
    assert "allow_split_physical_axes" in caplog.text
