"""Layers of a masked model computed on their live block (slimtorch.graph.live): the masked op's values,
and the blocks reused by compaction's surgery."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import slimtorch
import slimtorch.compact.plan as plan_module
from slimtorch.compact.surgery import reusing, shrink_linear_
from slimtorch.graph import build_graph
from slimtorch.graph.live import BlockOps, Cut, live_blocks

LINEAR, CONVS = torch._C._nn.linear, {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _mask(out: int, cin: int, kernel: tuple, dead_rows: bool, dead_cols: bool) -> torch.Tensor:
    mask = torch.ones(out, cin, *kernel, dtype=torch.bool)
    if dead_rows:
        mask[1::3] = False
    if dead_cols:
        mask[:, ::2] = False
    return mask


def _run(func, x, weight, bias, mask, *rest):
    masked = weight * mask
    ops = BlockOps(live_blocks({"w": mask}), {id(masked): "w"})
    got = ops.run(func, (x, masked, bias, *rest), {})
    return got, func(x, masked, bias, *rest)


@pytest.mark.parametrize("dead", [(True, False), (False, True), (True, True)], ids=["rows", "cols", "both"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 32), (2, 3, 32)])
def test_linear_on_its_live_block_is_the_masked_linear(dead, bias, shape):
    torch.manual_seed(0)
    x, weight = torch.randn(*shape), torch.randn(7, 32)
    b = torch.randn(7) if bias else None
    got, want = _run(LINEAR, x, weight, b, _mask(7, 32, (), *dead))
    assert got is not None
    torch.testing.assert_close(got, want)
    if dead[0]:  # a masked row gives exactly its bias (or zero)
        assert torch.equal(got[..., 1::3], (b[1::3] if bias else torch.zeros(2)).expand_as(got[..., 1::3]))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("dead", [(True, False), (False, True), (True, True)], ids=["rows", "cols", "both"])
def test_convolution_on_its_live_block_is_the_masked_convolution(dims, dead):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, *[7] * dims), torch.randn(5, 6, *[3] * dims), torch.randn(5)
    got, want = _run(CONVS[dims], x, weight, bias, _mask(5, 6, (3,) * dims, *dead), 2, 1, 1, 1)
    assert got is not None
    torch.testing.assert_close(got, want)


def test_grouped_convolution_on_its_live_groups_is_the_masked_convolution():
    torch.manual_seed(0)
    groups = 2
    x, weight, bias = torch.randn(2, 6, 7, 7), torch.randn(6, 6 // groups, 3, 3), torch.randn(6)
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[:3] = False  # a whole group, the first of two
    mask[4, 0, 0, 0] = False  # and a single weight, inside a live group
    got, want = _run(torch.conv2d, x, weight, bias, mask, 1, 1, 1, groups)
    assert got is not None
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, :3], bias[:3, None, None].expand(2, 3, 7, 7))


def test_ops_it_cannot_cut_are_left_to_torch():
    weight, x = torch.randn(4, 2, 3, 3), torch.randn(1, 4, 5, 5)
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[::2] = False
    masked = weight * mask
    ops = BlockOps(live_blocks({"w": mask}), {id(masked): "w"})
    assert ops.run(torch.conv2d, (x, masked, None, 1, 0, 1, 2), {}) is None  # grouped, every group live
    assert ops.run(torch.conv2d, (x[:, :3], masked[:, :1], None), {}) is None  # another tensor
    assert ops.run(torch.conv2d, (x, masked), {"bias": None}) is None  # keyword arguments
    assert ops.run(torch.conv2d, (x[:, :3], masked), {}) is None  # a wrong shape: torch's own error
    assert ops.run(torch.relu, (x,), {}) is None
    # a depthwise convolution, or a block that saves fewer multiply-adds than the copies it costs
    dw = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    dw[::2] = False
    depthwise = torch.randn(4, 1, 3, 3) * dw
    assert BlockOps(live_blocks({"w": dw}), {id(depthwise): "w"}).run(torch.conv2d, (x, depthwise, None, 1, 0, 1, 4),
                                                                    {}) is None
    wide = torch.ones(100, 8, dtype=torch.bool)
    wide[0] = False  # 8 multiply-adds saved per position for 199 values copied
    one_row = torch.randn(100, 8) * wide
    assert BlockOps(live_blocks({"w": wide}), {id(one_row): "w"}).run(LINEAR, (torch.randn(3, 8), one_row), {}) is None
    nothing, empty = torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2)  # a fully masked layer
    assert BlockOps(live_blocks({"w": nothing}), {id(empty): "w"}).run(LINEAR, (torch.randn(1, 2), empty), {}) is None
    assert live_blocks({"w": torch.ones(3, 2, dtype=torch.bool), "b": torch.zeros(3, dtype=torch.bool)}) == {}


def _masked_resnet():
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
    masks = slimtorch.compute_masks(model, config, example_inputs=x)
    params = dict(model.named_parameters())
    return model, x, masks, {n: params[n].detach() * masks[n] for n in masks}


@pytest.mark.parametrize("path", ["replay", "full trace"])
def test_a_measured_run_on_live_blocks_measures_what_the_masked_run_does(path):
    """The graph compaction plans from: same structure, the same exact zeros where channels are consumed,
    the same statistics and output up to the summation order of the live terms."""
    model, x, masks, masked = _masked_resnet()
    live = live_blocks(masks)
    assert len(live) == 21  # every conv loses rows or columns, the classifier columns
    want = build_graph(model, x, params=masked)
    trace = build_graph(model, x, values=False).trace if path == "replay" else None
    got = build_graph(model, x, params=masked, live=live, trace=trace)
    assert got.replayed == (path == "replay")
    assert len(live.cuts) == 21  # every one ran on its block
    assert len(got.sinks) == len(want.sinks) > 0
    for a, b in zip(got.sinks, want.sinks, strict=True):
        assert a.member == b.member and torch.equal(a.labels, b.labels)
        assert torch.equal(a.absmax == 0, b.absmax == 0)  # the zeros compaction relies on, exactly
        for s, t in ((a.absmax, b.absmax), (a.vmin, b.vmin), (a.vmax, b.vmax)):
            torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.output, want.output, rtol=1e-4, atol=1e-5)


def test_compaction_takes_the_blocks_the_measured_run_cut(monkeypatch):
    model, x, masks, _ = _masked_resnet()
    made = []
    monkeypatch.setattr(plan_module, "live_blocks", lambda m: made.append(live_blocks(m)) or made[-1])
    slimtorch.compact_(model, masks, example_inputs=x, verify=False)  # (unchecked: planned from a measured run)
    (live,) = made
    blocks = {c.block.data_ptr() for c in live.cuts.values()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(c.weight.data_ptr() in blocks for c in convs)


def test_a_block_is_reused_only_for_the_same_unchanged_weight_and_indices():
    torch.manual_seed(0)
    source, rows, cols = torch.randn(6, 4), torch.tensor([0, 2, 5]), torch.tensor([1, 3])
    block = source[rows][:, cols]
    cuts = {source.data_ptr(): Cut(source, source._version, rows, cols, block)}

    def shrunk(keep_in, keep_out, change=None):
        layer = nn.Linear(4, 6)
        layer.weight = nn.Parameter(source.detach())  # the same memory, as compaction's masked weights
        if change:
            change(source)
        with reusing(cuts):
            shrink_linear_(layer, keep_in, keep_out)
        torch.testing.assert_close(layer.weight.detach(), source[keep_out][:, keep_in])
        return layer.weight.data_ptr() == block.data_ptr()

    assert shrunk(cols, rows)
    assert not shrunk(cols, torch.tensor([0, 2, 4]))
    assert not shrunk(torch.arange(4), rows)
    assert not shrunk(cols, rows, change=lambda t: t.mul_(2))  # changed in place since it was cut


def test_attention_projections_run_on_their_blocks_and_linear_is_given_back():
    from nets import Tokens

    model, x = Tokens().eval(), torch.randn(2, 3, 8, 8)
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}, {"exclude": True, "op_names": ["head"]}]
    masks = slimtorch.compute_masks(model, config, example_inputs=x)
    params = dict(model.named_parameters())
    masked = {n: params[n].detach() * masks[n] for n in masks}
    live = live_blocks(masks)
    want = build_graph(model, x, params=masked)
    got = build_graph(model, x, params=masked, live=live)
    projections = [n for n in live if n.endswith(("in_proj_weight", "out_proj.weight"))]
    assert len(projections) == 4 and {masked[n].data_ptr() for n in projections} <= set(live.cuts)
    assert torch.nn.functional.linear is LINEAR
    torch.testing.assert_close(got.output, want.output, rtol=1e-4, atol=1e-5)
    assert [torch.equal(a.absmax == 0, b.absmax == 0) for a, b in zip(got.sinks, want.sinks, strict=True)] == \
        [True] * len(want.sinks)


def test_a_mask_of_whole_rows_and_columns_is_exact():
    """``exact``: the mask keeps every entry of its live rows and columns, so that on its live block the
    masked weight is the weight itself."""
    rows_cols = _mask(6, 4, (3, 3), True, True)
    hole = rows_cols.clone()
    hole[0, 1, 0, 0] = False  # one weight inside the live block
    kernel = rows_cols.clone()
    kernel[:, :, 1, 1] = False  # a kernel position of every row: the same live rows and columns
    big, big_hole = _mask(64, 128, (3, 3), True, False), _mask(64, 128, (3, 3), True, False)  # (counted by torch)
    big_hole[0, 0, 0, 0] = False
    live = live_blocks({"a": rows_cols, "b": hole, "c": kernel, "d": torch.ones(3, 2, dtype=torch.bool),
                        "e": big, "f": big_hole, "g": torch.zeros(3, 2, dtype=torch.bool)})
    assert live.exact == {"a", "d", "e", "g"}
    assert all(torch.equal(torch.from_numpy(live.alive[n][0]), rows_cols.flatten(1).any(1)) for n in "abc")


class _Reads(nn.Module):
    """Reads its weights in the ways a forward pass may: a convolution and a linear layer that pay to run on
    their block, a depthwise convolution that does not, a matrix product and ``.data``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.linear = nn.Linear(32, 64)
        self.matrix = nn.Parameter(torch.randn(64, 16))

    def forward(self, x):
        x = self.linear(self.depthwise(self.conv(x)).mean(dim=(2, 3)))
        return x @ self.matrix + x @ self.matrix.data


def _unmasked_run(model, masks, x):
    """``model`` run under BlockMode with the masked weights left as they are (``unmasked``), and run with its
    weights masked; returns both outputs and the ops."""
    from slimtorch.graph.live import BlockMode

    x = x if isinstance(x, tuple) else (x,)
    params = dict(model.named_parameters())
    live = live_blocks(masks)
    assert live.exact == set(masks)
    ops = BlockOps(live, {id(p): n for n, p in params.items()}, masks)
    with torch.no_grad(), BlockMode(ops):
        got = model(*x)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in masked.named_parameters():
            if n in masks:
                p.mul_(masks[n])
        want = masked(*x)
    return got, want, ops, live


def test_weights_left_unmasked_are_masked_wherever_a_run_reads_them_whole():
    """A weight whose mask keeps exactly its live block runs as it is where its layer is cut to the block
    (the block is the masked one's); every other read (a layer not cut, a matrix product, ``.data``) gets
    its masked values, made once, on first use."""
    torch.manual_seed(0)
    model = _Reads().eval()
    masks = {"conv.weight": _mask(32, 8, (3, 3), True, True), "depthwise.weight": _mask(32, 1, (3, 3), True, False),
             "linear.weight": _mask(64, 32, (), True, True), "matrix": _mask(64, 16, (), True, False)}
    got, want, ops, live = _unmasked_run(model, masks, torch.randn(2, 8, 8, 8))
    torch.testing.assert_close(got, want)
    assert set(ops.made) == {id(model.depthwise.weight), id(model.matrix)}
    assert {model.conv.weight.data_ptr(), model.linear.weight.data_ptr()} <= set(live.cuts)  # cut as they are


def test_attention_weights_left_unmasked_are_masked_before_its_body_runs():
    """nn.MultiheadAttention's body runs with function modes off: its weights are masked before it starts."""
    torch.manual_seed(0)
    model = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    masks = {"in_proj_weight": _mask(96, 32, (), True, True), "out_proj.weight": _mask(32, 32, (), False, True)}
    x = torch.randn(2, 5, 32)
    got, want, ops, _ = _unmasked_run(model, masks, (x, x, x))
    torch.testing.assert_close(got[0], want[0])
    assert set(ops.made) == {id(model.in_proj_weight), id(model.out_proj.weight)}
    assert torch.nn.functional.linear is LINEAR


def test_a_grouped_convolution_left_unmasked_is_cut_from_its_masked_values():
    """Whole groups are cut, masked rows inside a live group included: those take the masked values."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 7, 7), torch.randn(6, 3, 3, 3), torch.randn(6)
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[[0, 1, 2, 4]] = False  # the first group, and a row of the second
    ops = BlockOps(live_blocks({"w": mask}), {id(weight): "w"}, {"w": mask})
    got = ops.call(torch.conv2d, (x, weight, bias, 1, 0, 1, 2), {})
    torch.testing.assert_close(got, torch.conv2d(x, weight * mask, bias, 1, 0, 1, 2))
    assert set(ops.made) == {id(weight)}
