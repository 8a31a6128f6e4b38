"""The dependency graph: one test per channel rule, on small nets whose coupling is known by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch
from slimtorch.errors import TraceError, UnsupportedOpError
from slimtorch.graph import build_graph, register_rule
from slimtorch.graph.labels import UnionFind, broadcast_merge, collapse, union_rows


def _units(graph, name, role="out"):
    return graph.unit_of(graph.member(name, role).labels)


def _same(graph, a, b, role_a="out", role_b="in"):
    return torch.equal(_units(graph, a, role_a), _units(graph, b, role_b))


class Fn(nn.Module):
    """A net defined by a function of its input and its own layers."""

    def __init__(self, fn, **layers):
        super().__init__()
        self.fn = fn
        for k, v in layers.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


def test_union_find_matches_a_plain_one_on_random_unions():
    """Every label points at its class's root (the smallest label of the class) after any sequence of
    unions, as a textbook union-find computes it (chains of roots linked in one call included)."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(2, 50, (1,), generator=rng))
        uf, parent = UnionFind(), list(range(n))
        uf.new(n)

        def root(i, parent=parent):
            while parent[i] != i:
                i = parent[i]
            return i

        for _ in range(int(torch.randint(1, 8, (1,), generator=rng))):
            a, b = torch.randint(0, n, (2, int(torch.randint(1, 12, (1,), generator=rng))), generator=rng)
            uf.union(a, b)
            for x, y in zip(a.tolist(), b.tolist(), strict=True):
                rx, ry = root(x), root(y)
                parent[max(rx, ry)] = min(rx, ry)
            assert uf.find(torch.arange(n)).tolist() == [root(i) for i in range(n)]


def test_adopt_gives_the_classes_union_gives():
    """``adopt`` (fresh labels tied straight to older ones) leaves the same classes as ``union``, on the fast
    path (the newest labels, still their own roots) and where it must fall back (older labels, labels
    already tied, partners newer than them)."""
    rng = torch.Generator().manual_seed(1)
    for case in range(200):
        fast, slow = UnionFind(), UnionFind()
        for uf in (fast, slow):
            old = uf.new(12)
            uf.union(old[:4], old[4:8])
        n = int(torch.randint(1, 6, (1,), generator=rng))
        fresh = fast.new(n)
        slow.new(n)
        partners = torch.randint(-1, 12, (n,), generator=rng)
        if case % 4 == 1:  # older labels: not fresh
            fresh = torch.arange(n)
        elif case % 4 == 2:  # already tied among themselves
            for uf in (fast, slow):
                uf.union(fresh[:1], fresh[-1:])
        elif case % 4 == 3:  # a partner newer than the fresh labels
            partners[0] = fast.new(1)[0]
            slow.new(1)
        fast.adopt(fresh, partners)
        slow.union(fresh, partners)
        everything = torch.arange(slow.size)
        assert torch.equal(fast.find(everything), slow.find(everything)), case


def test_union_find_and_label_helpers():
    uf = UnionFind()
    a, b = uf.new(4), uf.new(4)
    uf.union(a[:2], b[2:])
    assert uf.find(a[0]) == uf.find(b[2]) and uf.find(a[2]) != uf.find(b[2])
    grid = torch.stack([a, b]).reshape(1, 2, 4)  # a row of a's labels and a row of b's
    rows = union_rows(uf, grid, [2])  # a per-channel param ties a[i] to b[i]
    assert torch.equal(uf.find(a), uf.find(b)) and rows.shape == (4,)
    assert collapse(uf, grid).shape == (1, 1, 4)
    merged = broadcast_merge(uf, [torch.tensor([[-1, 5]]), torch.full((2, 1), -1)])  # (1, 2) with (2, 1)
    assert merged.tolist() == [[-1, int(uf.find(torch.tensor(5)))]]  # same in both rows: collapsed


def test_conv_bn_conv_chain():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    g = build_graph(net, torch.randn(1, 3, 8, 8))
    assert _same(g, "0.weight", "3.weight")
    assert torch.equal(_units(g, "0.weight"), _units(g, "1.weight", "norm"))
    assert torch.equal(_units(g, "0.bias"), _units(g, "0.weight"))
    assert g.member("1.running_mean", "norm").is_buffer
    assert len(g.blocked_units()) == 4  # conv 3 writes the output


def test_residual_add_ties_both_branches():
    net = Fn(lambda m, x: m.b(m.a(x)) + m.c(m.a(x)), a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(4, 6, 3, padding=1),
             c=nn.Conv2d(4, 6, 1))
    g = build_graph(net, torch.randn(1, 3, 5, 5))
    assert torch.equal(_units(g, "b.weight"), _units(g, "c.weight"))
    assert not torch.equal(_units(g, "a.weight"), _units(g, "b.weight"))


def test_cat_maps_channels_in_order():
    net = Fn(lambda m, x: m.c(torch.cat([m.a(x), m.b(x)], 1)), a=nn.Conv2d(3, 2, 1), b=nn.Conv2d(3, 3, 1),
             c=nn.Conv2d(5, 1, 1))
    g = build_graph(net, torch.randn(1, 3, 4, 4))
    consumer = _units(g, "c.weight", "in")
    assert torch.equal(consumer[:2], _units(g, "a.weight")) and torch.equal(consumer[2:], _units(g, "b.weight"))


def test_flatten_repeats_each_channel_over_positions():
    net = Fn(lambda m, x: m.fc(m.conv(x).flatten(1)), conv=nn.Conv2d(1, 3, 3), fc=nn.Linear(3 * 4, 2))
    g = build_graph(net, torch.randn(2, 1, 4, 4))
    assert torch.equal(_units(g, "fc.weight", "in"), _units(g, "conv.weight").repeat_interleave(4))


def test_hard_coded_view_is_a_fix_site():
    net = Fn(lambda m, x: m.fc(m.conv(x).view(-1, 12)), conv=nn.Conv2d(1, 3, 3), fc=nn.Linear(12, 2))
    g = build_graph(net, torch.randn(2, 1, 4, 4))
    (site,) = [s for s in g.fix_sites if s.kind == "shape"]
    assert site.key == ("", "view", 0)
    kept = torch.ones(1, 12, dtype=torch.bool)
    kept[0, 4:8] = False  # one channel of 4 positions removed
    assert site.compacted(kept)["sizes"] == {"1": 8}


def test_permute_to_channels_last_and_layer_norm():
    net = Fn(lambda m, x: m.fc(m.ln(m.conv(x).permute(0, 2, 3, 1))), conv=nn.Conv2d(3, 4, 1), ln=nn.LayerNorm(4),
             fc=nn.Linear(4, 2))
    g = build_graph(net, torch.randn(1, 3, 2, 2))
    assert torch.equal(_units(g, "ln.weight", "norm"), _units(g, "conv.weight"))
    assert _same(g, "conv.weight", "fc.weight")
    assert any(s.kind == "zero" for s in g.sinks)  # LayerNorm statistics read every channel


def test_channel_shuffle_ties_channel_j_of_every_group():
    net = Fn(lambda m, x: m.b(F.channel_shuffle(m.a(x), 2)), a=nn.Conv2d(3, 6, 1), b=nn.Conv2d(6, 2, 1))
    g = build_graph(net, torch.randn(1, 3, 2, 2))
    produced = _units(g, "a.weight")
    assert torch.equal(produced[:3], produced[3:])  # channel j of group 0 goes with channel j of group 1
    assert torch.equal(_units(g, "b.weight", "in"), produced[:3].repeat_interleave(2))


def test_view_transpose_shuffle_is_tied_like_channel_shuffle():
    def shuffle(m, x):
        y = m.a(x)
        y = y.view(1, 2, 3, 2, 2).transpose(1, 2).reshape(1, 6, 2, 2)
        return m.b(y)

    g = build_graph(Fn(shuffle, a=nn.Conv2d(3, 6, 1), b=nn.Conv2d(6, 2, 1)), torch.randn(1, 3, 2, 2))
    produced = _units(g, "a.weight")
    assert torch.equal(produced[:3], produced[3:])


def test_chunk_needs_equal_halves_and_split_sizes_are_fix_sites():
    def body(m, x):
        a, b = m.conv(x).chunk(2, dim=1)
        c, d = m.conv2(x).split([1, 3], dim=1)
        return a + b, c.sum() + d.sum()

    g = build_graph(Fn(body, conv=nn.Conv2d(3, 4, 1), conv2=nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 2, 2))
    halves = _units(g, "conv.weight").reshape(2, 2)
    assert torch.equal(halves[0], halves[1])  # a + b ties them (equal counts follow)
    assert any(c.shape == (2, 2) for c in g.constraints)
    (split,) = [s for s in g.fix_sites if s.kind == "split"]
    assert split.compacted(torch.tensor([[[[True]], [[False]], [[True]], [[True]]]]))["sizes"] == [1, 2]


def test_grouped_conv_keeps_groups_equal_and_depthwise_ties_in_to_out():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=8))
    g = build_graph(net, torch.randn(1, 3, 6, 6))
    assert g.member("1.weight", "in").groups == 2
    assert sum(c.shape == (2, 4) for c in g.constraints) == 2  # input and output sides of the grouped conv
    assert _same(g, "2.weight", "2.weight", "out", "in")  # depthwise: input channel j makes output j


def test_transposed_conv_output_channels_are_on_dim_1():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 6, 2, stride=2), nn.Conv2d(6, 1, 1))
    g = build_graph(net, torch.randn(1, 3, 3, 3))
    assert g.member("1.weight", "out").dim == 1 and g.member("1.weight", "in").dim == 0
    assert _same(g, "0.weight", "1.weight") and _same(g, "1.weight", "2.weight")


def test_group_norm_channels_go_by_whole_groups():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 1, 1))
    g = build_graph(net, torch.randn(1, 3, 2, 2))
    assert _units(g, "0.weight").unique().numel() == 2


def test_squeeze_excitation_gate_ties_to_the_main_path():
    def se(m, x):
        y = m.conv(x)
        gate = torch.sigmoid(m.up(F.relu(m.down(F.adaptive_avg_pool2d(y, 1)))))
        return m.out(y * gate)

    net = Fn(se, conv=nn.Conv2d(3, 8, 3), down=nn.Conv2d(8, 2, 1), up=nn.Conv2d(2, 8, 1), out=nn.Conv2d(8, 1, 1))
    g = build_graph(net, torch.randn(1, 3, 5, 5))
    assert torch.equal(_units(g, "up.weight"), _units(g, "conv.weight"))


def test_embedding_and_lstm():
    net = Fn(lambda m, x: m.fc(m.lstm(m.emb(x))[0]), emb=nn.Embedding(10, 6), lstm=nn.LSTM(6, 5, 2,
             batch_first=True, bidirectional=True), fc=nn.Linear(10, 2))
    g = build_graph(net, torch.randint(0, 10, (2, 3)))
    assert _same(g, "emb.weight", "lstm.weight_ih_l0")
    hidden = _units(g, "lstm.weight_hh_l0", "in")
    assert torch.equal(_units(g, "lstm.weight_ih_l0"), hidden.repeat(4))  # 4 gate blocks
    last = torch.cat([_units(g, "lstm.weight_hh_l1", "in"), _units(g, "lstm.weight_hh_l1_reverse", "in")])
    assert torch.equal(_units(g, "fc.weight", "in"), last)
    assert any(c.shape == (4, 5) for c in g.constraints)  # one hidden size for 2 layers x 2 directions


def test_multihead_attention_module_rule():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    net = Fn(lambda m, x: m.fc(m.mha(m.inp(x), m.inp(x), m.inp(x))[0]), inp=nn.Linear(4, 8), mha=mha,
             fc=nn.Linear(8, 2))
    g = build_graph(net, torch.randn(1, 3, 4))
    assert _same(g, "inp.weight", "mha.in_proj_weight")
    rows = _units(g, "mha.in_proj_weight")
    assert torch.equal(rows[:8], rows[8:16])  # query channel i pairs with key channel i
    assert _same(g, "mha.out_proj.weight", "fc.weight")
    assert any(c.shape == (4, 4) for c in g.constraints)  # q/k and v heads keep one head size


def test_matmul_ties_contracted_channels_and_carries_values():
    def attention(m, x):
        q, k, v = m.q(x), m.k(x), m.v(x)
        return m.o(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)

    net = Fn(attention, q=nn.Linear(4, 6), k=nn.Linear(4, 6), v=nn.Linear(4, 6), o=nn.Linear(6, 2))
    g = build_graph(net, torch.randn(1, 5, 4))
    assert torch.equal(_units(g, "q.weight"), _units(g, "k.weight"))
    assert _same(g, "v.weight", "o.weight")
    assert any(s.kind == "pair" for s in g.sinks)


def test_einsum_is_a_contraction():
    net = Fn(lambda m, x: m.o(torch.einsum("b i d, b j d -> b i j", m.q(x), m.k(x))), q=nn.Linear(4, 6),
             k=nn.Linear(4, 6), o=nn.Linear(5, 2))
    g = build_graph(net, torch.randn(1, 5, 4))
    assert torch.equal(_units(g, "q.weight"), _units(g, "k.weight"))


def test_reductions_over_channels_block_or_sink():
    net = Fn(lambda m, x: (m.a(x).mean(dim=1), m.b(x).sum(dim=1), m.c(x).softmax(dim=1)),
             a=nn.Linear(3, 4), b=nn.Linear(3, 4), c=nn.Linear(3, 4))
    g = build_graph(net, torch.randn(2, 3))
    blocked = g.blocked_units()
    assert all(int(u) in blocked for u in _units(g, "a.weight"))  # a mean depends on the channel count
    assert "softmax" in blocked[int(_units(g, "c.weight")[0])]
    assert any(s.kind == "zero" for s in g.sinks)  # a sum only needs removed channels to be zero


def test_sdpa_default_scale_blocks_head_channels():
    net = Fn(lambda m, x: F.scaled_dot_product_attention(m.q(x), m.k(x), m.v(x)), q=nn.Linear(4, 6),
             k=nn.Linear(4, 6), v=nn.Linear(4, 6))
    g = build_graph(net, torch.randn(1, 5, 4))
    assert "default scale" in g.blocked_units()[int(_units(g, "q.weight")[0])]


def test_parameters_used_directly_join_the_channels_they_meet():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 4)
            self.cls = nn.Parameter(torch.randn(1, 1, 4))
            self.pos = nn.Parameter(torch.randn(1, 3, 4))
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            y = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], dim=1) + self.pos
            return self.ln(y)[:, 0]

    g = build_graph(Tokens(), torch.randn(2, 2, 3))
    stream = _units(g, "proj.weight")
    assert torch.equal(_units(g, "cls", "element").reshape(4), stream)
    assert torch.equal(_units(g, "pos", "element"), stream.expand(1, 3, 4))


def test_unknown_op_raises_or_blocks():
    @register_rule("unknown_test_op_never_registered")
    def _never(ctx):  # a rule for another op does not cover torch.cumprod... on channels: use an op we lack
        raise AssertionError

    net = Fn(lambda m, x: m.b(torch.fft.fft(m.a(x)).real), a=nn.Linear(3, 4), b=nn.Linear(4, 2))
    with pytest.raises(UnsupportedOpError, match="fft_fft"):
        build_graph(net, torch.randn(2, 3))
    g = build_graph(net, torch.randn(2, 3), unknown_ops="keep")
    assert "unknown op" in g.blocked_units()[int(_units(g, "a.weight")[0])]


def test_view_as_another_dtype_keeps_channels_only_when_elements_stay_whole():
    same = Fn(lambda m, x: m.b(m.a(x).view(torch.int32).view(torch.float32)), a=nn.Linear(3, 4), b=nn.Linear(4, 2))
    g = build_graph(same, torch.randn(2, 3), values=False)
    assert _same(g, "a.weight", "b.weight")
    split = Fn(lambda m, x: m.b(m.a(x).view(torch.float16).float()[..., :4]), a=nn.Linear(3, 4), b=nn.Linear(4, 2))
    with pytest.raises(UnsupportedOpError, match="view as torch.float16"):
        build_graph(split, torch.randn(2, 3))


def test_trace_leaves_the_model_alone_and_reports_failures():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    before = net[1].running_mean.clone()
    build_graph(net, torch.randn(2, 3, 4, 4))
    assert torch.equal(net[1].running_mean, before) and net.training
    with pytest.raises(TraceError, match="failed to run"):
        build_graph(net, torch.randn(2, 5, 4, 4))


def test_cover_traces_train_only_branches():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.aux, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 1, 1), nn.Conv2d(4, 1, 1)

        def forward(self, x):
            y = self.a(x)
            return (self.b(y), self.aux(y)) if self.training else self.b(y)

    net = Aux().eval()
    assert build_graph(net, torch.randn(1, 3, 2, 2)).unreached == ["aux"]
    g = build_graph(net, torch.randn(1, 3, 2, 2), cover=True)
    assert g.unreached == [] and not net.training


# -- the shapes-only trace (values=False) ------------------------------------------------------------------


def test_shapes_only_trace_is_used_and_exact_on_a_plain_net():
    from nets import Residual, graph_structure

    net, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    fast, real = build_graph(net, x, values=False), build_graph(net, x)
    assert not fast.measured and real.measured
    assert fast.sinks == [] and fast.output is None and real.sinks and real.output is not None
    assert graph_structure(fast) == graph_structure(real)


# -- replaying a shapes-only trace's tape (values measured on one checked forward pass) ---------------------


class _Switch(nn.Module):
    """Takes another path when ``wide`` is flipped, with the same parameters and input shapes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)
        self.register_buffer("order", torch.arange(6))
        self.wide = False

    def forward(self, x):
        y = self.a(x)[:, self.order]
        return self.b(y + y if self.wide else y.relu())


def test_replay_measures_what_a_full_trace_measures_with_given_values():
    from nets import graph_structure, measured_values

    net, x = _Switch().eval(), torch.randn(2, 3, 4, 4)
    trace = build_graph(net, x, values=False).trace
    keep = torch.arange(6) % 2 == 0
    masked = {"a.weight": net.a.weight.detach() * keep[:, None, None, None], "a.bias": net.a.bias.detach() * keep}
    replayed = build_graph(net, x, params=masked, trace=trace)
    real = build_graph(net, x, params=masked)
    assert replayed.replayed and replayed.measured and not real.replayed
    assert graph_structure(replayed) == graph_structure(real)
    assert measured_values(replayed) == measured_values(real)
    (into_b,) = [sink for sink in replayed.sinks if sink.member == ("b.weight", 1, "in")]
    assert bool((into_b.absmax[1::2] == 0).all()) and bool((into_b.absmax[::2] > 0).all())  # as masked


@pytest.mark.parametrize("change", ["branch", "index", "input_shape", "mode"])
def test_replay_traces_in_full_when_the_run_differs(change):
    """A template is used only when the run follows it op by op: another branch, other index values,
    other input shapes or another mode mean a full trace (whose result is then the truth)."""
    from nets import graph_structure, measured_values

    net, x = _Switch().eval(), torch.randn(2, 3, 4, 4)
    trace = build_graph(net, x, values=False).trace
    if change == "branch":
        net.wide = True
    elif change == "index":
        net.order.copy_(net.order.flip(0))
    elif change == "input_shape":
        x = torch.randn(1, 3, 5, 5)
    else:
        net.train()
    graph = build_graph(net, x, trace=trace)
    assert not graph.replayed
    assert graph_structure(graph) == graph_structure(build_graph(net, x))
    assert measured_values(graph) == measured_values(build_graph(net, x))


def test_a_template_goes_with_its_model():
    import gc
    import weakref

    net = _Switch().eval()
    graph = build_graph(net, torch.randn(2, 3, 4, 4), values=False)  # (kept: its trace must not keep the model)
    assert graph.trace is not None
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_compaction_after_pruning_replays_the_pruning_trace():
    from nets import Residual, oracle
    from slimtorch.compact import plan_compaction

    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    masks = slimtorch.compute_masks(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5},
                                            {"exclude": True, "op_names": ["fc"]}], example_inputs=x)
    assert plan_compaction(model, masks, example_inputs=x).graph.replayed
    oracle(model, masks, x)


class _DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > -1e9:  # control flow on a value: a shapes-only trace cannot follow it
            y = y.relu()
        return self.b(y)


class _DataIndex(nn.Module):
    """Channels reordered by an index computed from the weights: on meta tensors that index would be
    garbage, so the trace must fall back (a wrong order would tie the wrong channels)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        order = torch.argsort(self.a.weight.sum(dim=(1, 2, 3)))
        return self.b(self.a(x)[:, order])


class _BufferIndex(nn.Module):
    """A channel permutation held in an integer buffer: integer tensors stay real in the shapes-only trace."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)
        self.register_buffer("order", torch.tensor([3, 1, 5, 0, 2, 4]))

    def forward(self, x):
        return self.b(self.a(x)[:, self.order])


class _ComputedMask(nn.Module):
    """A mask computed from a constant (Swin's shifted-window attention mask): elementwise rules never read
    values, so the shapes-only trace keeps going."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        mask = y.new_zeros(y.shape[-2:]) != 0
        return self.b(y.masked_fill(mask, -1.0))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one tensor under two names: its channels are the same channels

    def forward(self, x):
        return self.b(self.a(x).relu())


@pytest.mark.parametrize(("net", "fast"), [(_DataBranch, False), (_DataIndex, False), (_BufferIndex, True),
                                           (_ComputedMask, True), (_Tied, True)],
                         ids=["branch", "data_index", "buffer_index", "computed_mask", "tied"])
def test_shapes_only_trace_falls_back_when_values_matter(net, fast):
    from nets import assert_shapes_trace_exact

    model = net().eval()
    x = torch.randn(2, 4) if net is _Tied else torch.randn(2, 3, 4, 4)
    assert assert_shapes_trace_exact(model, x) is fast


def test_shapes_only_trace_checks_what_it_computes_itself():
    """Ops whose output the shapes-only trace makes itself still fail where torch would (here a LayerNorm
    sized for another width), so build_graph reports the model's error, not a graph."""
    net = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(5))
    with pytest.raises(TraceError):
        build_graph(net, torch.randn(2, 3), values=False)


def test_shapes_only_conv_output_shape_is_torchs():
    """The shapes-only trace computes conv output shapes itself (torch's meta kernel is slow Python); over a
    grid of strides, paddings, dilations, groups and sizes it gives torch's shape or defers to torch."""
    import itertools

    from slimtorch.graph.shapes import _conv_shape

    convs = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    for k, stride, pad, dil, groups, size in itertools.product([1, 2, 3], [1, 2], [0, 2], [1, 2], [1, 2], [4, 9]):
        x = torch.empty((2, 4) + (size,) * k, device="meta")
        w = torch.empty((6, 4 // groups) + (3,) * k, device="meta")
        mine = _conv_shape(x, (x, w, None, stride, pad, dil, groups), {})
        try:
            real = tuple(convs[k](x, w, None, stride, pad, dil, groups).shape)
        except RuntimeError:  # the kernel does not fit the input: the shortcut must defer
            real = None
        assert mine in (real, None) and (mine is not None) == (real is not None)
    x, w = torch.empty(1, 4, 8, 8, device="meta"), torch.empty(6, 4, 3, 3, device="meta")
    assert _conv_shape(x, (x, w), {"padding": "same"}) is None  # string padding: torch decides
    assert _conv_shape(x, (x, w), {"stride": 2}) == (1, 6, 3, 3)


def test_shapes_only_attention_outputs_are_torchs():
    """nn.MultiheadAttention's outputs on meta tensors, computed by the shapes-only trace itself, match
    torch's for self- and cross-attention, with and without weights; masks and extra biases defer to
    torch."""
    import itertools

    from slimtorch.graph.shapes import _attention_shape

    calls = []
    original = F.multi_head_attention_forward

    def spy(*args, **kwargs):
        calls.append((args, kwargs, original(*args, **kwargs)))
        return calls[-1][2]

    for batch_first, source, need, average, bias in itertools.product([True, False], [5, 7], [True, False],
                                                                     [True, False], [True, False]):
        mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, device="meta")
        q = torch.empty((3, 5, 8) if batch_first else (5, 3, 8), device="meta")
        kv = torch.empty((3, source, 8) if batch_first else (source, 3, 8), device="meta")
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "multi_head_attention_forward", spy)
            mha(q, kv, kv, need_weights=need, average_attn_weights=average)
        ((args, kwargs, real),) = calls
        mine = _attention_shape(args, kwargs)
        assert [None if t is None else t.shape for t in mine] == [None if t is None else t.shape for t in real]
        masked = dict(kwargs, attn_mask=torch.empty(5, source, device="meta", dtype=torch.bool))
        assert _attention_shape(args, masked) is None


def test_shapes_only_sums_keep_torchs_layout():
    from slimtorch.graph.shapes import shape_of

    x = torch.empty(2, 3, 4, 4, device="meta").to(memory_format=torch.channels_last)
    for other in (2.0, torch.empty_like(x)):
        out = shape_of(torch.add, (x, other), {})
        real = torch.add(x, other)
        assert out.shape == real.shape and out.stride() == real.stride() == x.stride()
    assert shape_of(torch.add, (x, torch.empty(2, 3, 4, 4, device="meta")), {}) is None  # other layout: torch
    assert shape_of(torch.add, (x, torch.empty(1, 3, 1, 1, device="meta")), {}) is None  # broadcast: torch
    assert shape_of(torch.Tensor.add_, (x, 1.0), {}) is x


def test_substituted_runs_with_other_tensors_and_puts_the_models_back():
    from slimtorch.graph.run import substituted

    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    net[2].weight = net[0].weight  # tied: a value for one name holds for both
    own = dict(net.state_dict(keep_vars=True))
    zero = torch.zeros(3, 3)
    with substituted(net, {"0.weight": zero, "1.running_mean": torch.ones(3)}):
        assert net[0].weight is zero and net[2].weight is zero
        assert torch.equal(net[1].running_mean, torch.ones(3))
    assert all(v is own[k] for k, v in net.state_dict(keep_vars=True).items())
    with pytest.raises(ValueError, match="one tied tensor"), substituted(net, {"0.weight": zero, "2.weight": zero + 1}):
        pass
    with pytest.raises(RuntimeError, match="inside"), substituted(net, {"0.weight": zero}):
        raise RuntimeError("inside")
    assert all(v is own[k] for k, v in net.state_dict(keep_vars=True).items())


def test_collector_paused_during_tracing_and_restored_after():
    import gc

    from slimtorch.graph.run import collector_paused

    net, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), torch.randn(1, 3, 6, 6)
    seen = []
    net[1].register_forward_hook(lambda *_: seen.append(gc.isenabled()))
    assert gc.isenabled()
    build_graph(net, x)
    slimtorch.compute_masks(net, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x)
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(RuntimeError, match="inside"), collector_paused():
        raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:  # a process that keeps the collector off keeps it off
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


class CachesAnchors(nn.Module):
    """A detector head that computes its anchors from the size of its input once and keeps them until the size
    changes (as Ultralytics' Detect and RT-DETR heads do); its stride is a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.stride, self.shape, self.cache = torch.tensor([8.0]), None, {}

    def forward(self, x):
        y = self.head(F.relu(self.conv(x)))
        if self.shape != y.shape:
            h, w = y.shape[2:]
            grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).to(y)
            self.anchors, self.shape = grid.repeat(2, 1, 1) * self.stride.to(y.device), y.shape
            self.cache["anchors"] = self.anchors
        return y + self.anchors


def test_a_forward_that_caches_tensors_keeps_nothing_of_a_traced_run():
    """The shapes-only trace ran the cache on meta tensors and left them in the model: the next run of the same
    size found meta anchors ("Tensor on device cpu is not on the expected device meta", every YOLO model)."""
    model, x = CachesAnchors().eval(), torch.randn(2, 3, 6, 6)
    cache = model.cache
    graph = build_graph(model, x, values=False)
    assert not graph.measured and model.shape is None and not hasattr(model, "anchors") and model.cache == {}
    assert model.cache is cache  # (a container keeps its identity)
    model(x)
    anchors = model.anchors
    build_graph(model, x, values=False)
    assert model.anchors is anchors and model.cache["anchors"] is anchors and not anchors.is_meta
    masks = slimtorch.compute_masks(model, [{"op_names": ["conv"], "sparse_ratio": 0.5}], example_inputs=x)
    slimtorch.compact_(model, masks, example_inputs=x)
    assert model.conv.out_channels == 4


class LearnableAffine(nn.Module):
    """One learnable scale and offset for every channel (HGNetV2's ``LearnableAffineBlock``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.tensor([1.5])), nn.Parameter(torch.tensor([0.25]))

    def forward(self, x):
        return self.scale * x + self.bias


def test_a_one_element_parameter_shared_by_the_channels_does_not_tie_them():
    """Its one label tied every channel it met into one unit: the conv before it was left whole, without a word
    (HGNetV2 compacted to 1.00x)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), LearnableAffine(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(model, x, values=False)
    assert len(torch.unique(graph.unit_of(graph.member("0.weight").labels))) == 8
    masks = slimtorch.compute_masks(model, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x)
    ref = copy.deepcopy(model)
    slimtorch.apply_masks_(ref, masks)
    slimtorch.compact_(model, masks, example_inputs=x)
    assert model[0].out_channels == 4 and model[3].in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
