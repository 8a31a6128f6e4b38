"""compact_: the compacted model computes what the masked model computes, on every channel pattern."""

import copy
import warnings

import pytest
import torch
from torch import nn

import slimtorch.compact.compact as compact_module
import slimtorch.compact.plan as plan_module
from nets import (
    ChannelsLast,
    Conv1d3d,
    Dense,
    Grouped,
    Recurrent,
    Residual,
    Shuffle,
    SplitSteps,
    SqueezeExcite,
    Tokens,
    Transposed,
    assert_shapes_trace_exact,
    oracle,
    randomize_,
)
from slimtorch import compact_, compute_masks
from slimtorch.compact import SlimMultiheadAttention, ZeroPaddedLayerNorm, plan_compaction
from slimtorch.compact.kept_masks import cut_masks
from slimtorch.compact.surgery import SHRINKS
from slimtorch.errors import CompactionError, SlimWarning, UnsupportedOpError
from slimtorch.graph import build_graph

IMAGE = torch.randn(2, 3, 8, 8)

CASES = {
    "residual": (Residual, IMAGE, ["Conv2d"], "fc"),
    "dense_cat": (Dense, IMAGE, ["Conv2d"], "head"),
    "split_steps": (SplitSteps, IMAGE, ["Conv2d"], "out"),
    "shuffle": (Shuffle, IMAGE, ["Conv2d"], "out"),
    "grouped": (Grouped, IMAGE, ["Conv2d"], "body.6"),
    "transposed": (Transposed, IMAGE, ["Conv2d", "ConvTranspose2d"], "body.6"),
    "squeeze_excite": (SqueezeExcite, IMAGE, ["Conv2d"], "out"),
    "tokens_mha": (Tokens, IMAGE, ["Conv2d", "Linear"], "head"),
    "channels_last": (ChannelsLast, IMAGE, ["Conv2d", "Linear"], "head"),
    "conv1d_3d": (Conv1d3d, torch.randn(2, 3, 8), ["Conv1d", "Conv3d"], "fc"),
    "lstm": (Recurrent, torch.randint(0, 20, (2, 5)), ["Embedding"], "fc"),
    "gru": (lambda: Recurrent(nn.GRU), torch.randint(0, 20, (2, 5)), ["Embedding"], "fc"),
}


def _masks(model, x, op_types, last, ratio=0.5):
    cfg = [{"op_types": op_types, "sparse_ratio": ratio}, {"exclude": True, "op_names": [last]}]
    return compute_masks(model, cfg, example_inputs=x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compacted_equals_masked(case):
    make, x, op_types, last = CASES[case]
    model = make().eval()
    randomize_(model)
    masks = _masks(model, x, op_types, last)
    before = sum(p.numel() for p in model.parameters())
    oracle(model, masks, x)
    assert sum(p.numel() for p in model.parameters()) < before
    assert model.slimtorch_compaction["channels_removed"] == model.slimtorch_compaction["channels_requested"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruning_graph_from_shapes_equals_the_real_trace(case):
    make, x, _, _ = CASES[case]
    model = make().eval()
    assert_shapes_trace_exact(model, x)
    model.train()
    assert_shapes_trace_exact(model, x)


@pytest.mark.parametrize("case", ["residual", "dense_cat", "shuffle", "split_steps"])
def test_train_mode_too(case):
    make, x, op_types, last = CASES[case]
    model = make().train()
    randomize_(model)
    oracle(model, _masks(model, x, op_types, last), x, train=True)  # also checks the mode is kept


def _unit_masks(model, x, pick):
    """Masks removing, in every row of every equal-count constraint that ``pick(rows)`` selects, the first
    two channels: a way to prune hidden units and heads that no config entry reaches."""
    graph = build_graph(model, x)
    roots = graph.uf.roots()
    removed = torch.zeros(roots.numel(), dtype=torch.bool)
    for rows in graph.constraints:
        if pick(rows):
            removed[roots[rows[:, :2]]] = True
    return graph.masks(removed, dict(model.named_parameters()))


def test_lstm_hidden_units_and_mha_heads():
    lstm = Recurrent().eval()
    x = torch.randint(0, 20, (2, 5))
    oracle(lstm, _unit_masks(lstm, x, lambda rows: rows.shape == (4, 6)), x)
    assert lstm.rnn.hidden_size == 4 and lstm.fc.in_features == 8
    tokens = Tokens().eval()
    randomize_(tokens)
    oracle(tokens, _unit_masks(tokens, IMAGE, lambda rows: rows.shape == (8, 4)), IMAGE)
    attn = tokens.blocks[0]["attn"]
    assert isinstance(attn, SlimMultiheadAttention) and attn.head_dim == 2 and attn.in_proj_weight.shape == (24, 16)


class _CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another; sequence-first (batch_first=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 8)
        self.attn, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

    def forward(self, x):  # (T, N, 8)
        kv = self.kv(x.flip(0))
        return self.head(self.attn(self.q(x), kv, kv, need_weights=False)[0])


def test_cross_attention_compacts_to_what_the_masked_one_computes():
    model, x = _CrossAttention().eval(), torch.randn(5, 2, 8)
    randomize_(model)
    cfg = [{"op_names": ["q", "kv"], "op_types": ["Linear"], "sparse_ratio": 0.5}]
    oracle(model, compute_masks(model, cfg, example_inputs=x), x)
    assert isinstance(model.attn, SlimMultiheadAttention) and model.attn.embed_dim == 4


def test_whole_heads_of_multihead_attention_stay_and_a_warning_says_so():
    model, x = _CrossAttention().eval(), torch.randn(5, 2, 8)
    cfg = [{"op_names": ["attn"], "op_types": ["MultiheadAttention"], "sparse_ratio": 0.5, "granularity": "head"}]
    with pytest.warns(SlimWarning, match=r"1 of the 1 units selected \(a channel, or a head taken whole\) stay"):
        masks = compute_masks(model, cfg, example_inputs=x)
    assert all(bool(m.all()) for m in masks.values())


def test_layernorm_over_removed_channels_is_zero_padded():
    model = Tokens().eval()
    randomize_(model)
    oracle(model, _masks(model, IMAGE, ["Conv2d"], "head"), IMAGE)
    assert isinstance(model.ln, ZeroPaddedLayerNorm) and model.ln.full_size == 16
    assert model.patch.out_channels == 8 and model.pos.shape == (1, 5, 8)


def test_keeps_dtype_device_requires_grad_and_mode():
    model = Residual().double().train()
    model.stem[0].weight.requires_grad_(False)
    x = IMAGE.double()
    oracle(model, _masks(model, x, ["Conv2d"], "fc"), x, train=True)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not model.stem[0].weight.requires_grad and model.a[0].weight.requires_grad


def _nni_style(model, names):
    """Masks on some convs' output channels only (what NNI's pruners produce), half the channels each."""
    masks = {}
    for name in names:
        w = model.get_submodule(name).weight
        keep = torch.arange(w.shape[0]) % 2 == 0
        masks[f"{name}.weight"] = keep.reshape(-1, *[1] * (w.dim() - 1)).expand_as(w).clone()
    return masks


def test_batchnorm_offsets_are_folded_or_kept_never_dropped():
    fold = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4,
                         2)).eval()
    randomize_(fold)
    # Masks on the conv alone (not group-consistent): the BatchNorm and the Linear's inputs shrink too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimWarning)
        oracle(fold, _nni_style(fold, ["0"]), torch.randn(2, 3, 4, 4), params=3 * 3 * 9 + 2 * 3 + 2 * 12 + 2)
    assert fold[0].out_channels == 3 and fold.slimtorch_compaction["folded_biases"] == ["4.bias"]
    padded = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3,
                           padding=1)).eval()
    randomize_(padded)
    with pytest.warns(SlimWarning, match=r"removed no channel.*3 output channels of '0.weight' \('3.weight' reads "
                                         r"their values, which are not zero there, and cannot take them into its bias"):
        oracle(padded, _nni_style(padded, ["0"]), torch.randn(2, 3, 6, 6),
               params=sum(p.numel() for p in padded.parameters()))
    assert padded[0].out_channels == 6  # a BatchNorm offset seen through zero padding cannot be folded


def test_failed_compaction_leaves_the_model_untouched(monkeypatch):
    model = Residual().eval()
    masks = _masks(model, IMAGE, ["Conv2d"], "fc")
    params, state = list(model.parameters()), copy.deepcopy(model.state_dict())
    empty = {"a.0.weight": torch.zeros_like(model.a[0].weight, dtype=torch.bool)}
    with pytest.raises(CompactionError, match="every output channel of 'a.0.weight'"):
        compact_(model, empty, example_inputs=IMAGE)

    def broken(module, keeps, options):
        SHRINKS_BEFORE["linear"](module, keeps, options)
        module.weight.data.add_(1.0)

    SHRINKS_BEFORE = dict(SHRINKS)
    monkeypatch.setitem(SHRINKS, "linear", broken)
    masks["fc.weight"] = torch.ones_like(model.fc.weight, dtype=torch.bool)
    masks["fc.weight"][:, 0] = False  # the classifier loses an input: its shrink function runs
    with pytest.raises(CompactionError, match="does not reproduce the masked one"):
        compact_(model, masks, example_inputs=IMAGE)
    assert list(model.parameters()) == params and not hasattr(model, "slimtorch_compaction")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _spy_measured_runs(monkeypatch) -> list:
    """Count the plan's measured runs of the masked model (its ``build_graph`` calls)."""
    calls = []
    real = plan_module.build_graph
    monkeypatch.setattr(plan_module, "build_graph", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_group_consistent_masks_are_planned_from_the_pruning_trace(monkeypatch):
    """After compute_masks, every requested channel is masked wherever it is consumed: no value can change
    the plan, so compact_ plans from the structure compute_masks traced and checks the result on a plain
    forward pass of the masked model, instead of running it through the graph. Without the check
    (``verify=False``) the plan is measured."""
    measured = _spy_measured_runs(monkeypatch)
    for verify, runs in ((True, 0), (False, 1)):
        model = Residual().eval()
        randomize_(model)
        masks = _masks(model, IMAGE, ["Conv2d"], "fc")
        measured.clear()
        if verify:
            oracle(model, masks, IMAGE)
        else:
            compact_(model, masks, example_inputs=IMAGE, verify=False)
        assert len(measured) == runs


def test_masks_whose_values_matter_are_measured(monkeypatch):
    """Masks on a conv alone leave its BatchNorm's offsets in the removed channels: whether they may go (or
    fold) depends on measured values, so the plan runs the masked model although a pruning trace is known."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4, 2)).eval()
    randomize_(model)
    x = torch.randn(2, 3, 4, 4)
    compute_masks(model, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x)  # (leaves its trace)
    measured = _spy_measured_runs(monkeypatch)
    oracle(model, _nni_style(model, ["0"]), x, params=3 * 3 * 9 + 2 * 3 + 2 * 12 + 2)
    assert len(measured) == 1 and model.slimtorch_compaction["folded_biases"] == ["4.bias"]


class _Flip(nn.Module):
    """Two convs, the channels reversed in between when ``flip`` is set (a Python switch: same shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.flip = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), False

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y.flip(1) if self.flip else y)


def test_a_model_that_no_longer_runs_as_traced_is_planned_again_from_a_measured_run(monkeypatch):
    """The pruning trace is taken on trust only as far as the check goes: a model switched since to another
    data flow (same shapes) fails the check, is restored, and is planned again from a measured run."""
    model = _Flip().eval()
    randomize_(model)
    masks = compute_masks(model, [{"op_names": ["a"], "sparse_ratio": 0.5}], example_inputs=IMAGE)
    model.flip = True
    measured = _spy_measured_runs(monkeypatch)
    attempts = []
    real = compact_module._apply_checked
    monkeypatch.setattr(compact_module, "_apply_checked", lambda *a: attempts.append(a[1].graph.measured) or real(*a))
    # as it runs now, a's channel c goes if its row is masked, or b's column 7 - c (which reads it) is
    rows = set(torch.nonzero(~masks["a.bias"]).flatten().tolist())
    kept = 8 - len(rows | {7 - r for r in rows})
    oracle(model, masks, IMAGE, params=kept * (27 + 1) + 4 * kept * 9 + 4)
    assert attempts == [False, True] and len(measured) == 1 and model.a.out_channels == kept < 8


def test_compaction_forgets_the_pruning_trace():
    model = Residual().eval()
    masks = _masks(model, IMAGE, ["Conv2d"], "fc")
    assert masks.trace is not None and masks.trace.fits(model, IMAGE, "error", cover=True)
    compact_(model, masks, example_inputs=IMAGE)
    assert not masks.trace.fits(model, IMAGE, "error", cover=True)  # (a later compaction traces in full)


def test_tied_weights_stay_tied_and_masked_under_every_name():
    """A weight shared by two layers (one tensor, two names) is masked under both: the trace runs the masked
    value everywhere, and the compacted model keeps one tensor. (Its output channels reach the model output
    through the second layer, so none can go.)"""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x).relu())

    model = Tied().eval()
    x = torch.randn(3, 4)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1] = False
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.a.weight.mul_(keep)  # (ref.b.weight is the same tensor)
    with pytest.warns(SlimWarning, match=r"1 output channels of 'a.weight' \(a.weight is shared by layers.*tied"):
        compact_(model, {"a.weight": keep}, example_inputs=x)
    assert model.a.weight is model.b.weight
    torch.testing.assert_close(model(x), ref(x))


def test_masks_that_remove_no_channel_say_so():
    """Masks on a BatchNorm alone (or on single weights) remove no channel: compact_ says so, names the way
    to masks that do, and leaves a model that computes what the masked one does."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    randomize_(net)
    x = torch.randn(2, 3, 6, 6)
    keep = torch.tensor([True, False, True, True])
    masks = {"1.weight": keep, "1.bias": keep}
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref[1].weight.mul_(keep)
        ref[1].bias.mul_(keep)
    with pytest.warns(SlimWarning, match="removed no channel.*compute_masks"):
        compact_(net, masks, example_inputs=x)
    assert net[0].out_channels == 4
    torch.testing.assert_close(net(x), ref(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full masks: nothing asked, nothing said
        compact_(net, {"0.weight": torch.ones_like(net[0].weight, dtype=torch.bool)}, example_inputs=x)


def test_unknown_ops_are_named_or_kept_on_request():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.fft.fft(self.a(x)).real)

    model, x = Odd(), torch.randn(2, 3)
    masks = {"a.weight": (torch.arange(4) < 2)[:, None].expand(4, 3).clone()}
    with pytest.raises(UnsupportedOpError, match="fft_fft"):
        compact_(model, masks, example_inputs=x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compact_(model, masks, example_inputs=x, unknown_ops="keep")
    assert model.a.out_features == 4
    assert any("removed no channel" in str(w.message) and "2 output channels of 'a.weight' (unknown op 'fft_fft'"
               in str(w.message) for w in record)
    assert model.slimtorch_compaction["masked_channels_kept"] == [
        {"parameter": "a.weight", "side": "output", "channels": 2, "reason": "unknown op 'fft_fft' in module '<root>'"}]


def test_plan_is_pure():
    model = Dense().eval()
    state = copy.deepcopy(model.state_dict())
    plan = plan_compaction(model, _masks(model, IMAGE, ["Conv2d"], "head"), example_inputs=IMAGE)
    assert plan.removed_count == plan.requested > 0 and plan.modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_mixed_train_and_eval_modes_are_kept_module_by_module():
    model = Residual().train()
    model.a.eval()  # e.g. a frozen part: compaction runs the model in eval mode and must give each its own back
    modes = [m.training for m in model.modules()]
    compact_(model, _masks(model, IMAGE, ["Conv2d"], "fc"), example_inputs=IMAGE)
    assert [m.training for m in model.modules()] == modes


def test_weights_whose_masks_keep_their_live_block_are_not_copied_masked(monkeypatch):
    """compute_masks' masks keep rows times columns: the plan leaves those weights as they are (no masked
    copy of the model's memory), the compacted layers take their own values, and the result is the masked
    model's."""
    import torchvision

    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    randomize_(model)
    masks = _masks(model, x, ["Conv2d"], "fc")
    plan = plan_compaction(model, masks, example_inputs=x, measure=False)
    assert not plan.graph.measured
    assert len(plan.unmasked) > 10 and not set(plan.unmasked) & set(plan.masked)
    assert set(plan.unmasked) | set(plan.masked) == set(masks)
    assert all(n.endswith(".weight") and masks[n].dim() >= 2 for n in plan.unmasked)  # (not the norms)
    attempts = []
    real = compact_module._apply_checked
    monkeypatch.setattr(compact_module, "_apply_checked", lambda *a: attempts.append(a[1].unmasked) or real(*a))
    oracle(model, masks, x)
    assert len(attempts) == 1 and attempts[0].keys() == plan.unmasked.keys()  # (checked the first time)


def test_a_weight_that_keeps_a_masked_row_is_copied_masked():
    """A requested channel that stays (here: it reaches the model output) keeps its masked row, whose values
    must be the masked ones: that weight is masked before the surgery, the others are not."""
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    randomize_(model)
    x = torch.randn(2, 16, 8, 8)
    masks = compute_masks(model, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x)  # (traced)
    rows = torch.ones(32, dtype=torch.bool)
    rows[::4] = False
    masks["2.weight"] = masks["2.weight"] & rows[:, None, None, None]
    masks["2.bias"] = rows
    plan = plan_compaction(model, masks, example_inputs=x, measure=False)
    assert not plan.graph.measured and plan.kept
    assert set(plan.unmasked) == {"0.weight"} and "2.weight" in plan.masked
    with pytest.warns(SlimWarning, match="output channels of '2.weight' \\(reaches the model output"):
        oracle(model, masks, x, params=16 * 16 * 9 + 16 + 32 * 16 * 9 + 32)
    assert torch.equal(model[2].weight[::4], torch.zeros_like(model[2].weight[::4]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_weight_left_unmasked_however_small(case, monkeypatch):
    """The synthetic nets (every op of the channel rules) with every exact mask left unmasked, whatever its
    size: the same result, checked the first time (no second, measured attempt)."""
    monkeypatch.setattr(plan_module, "_UNMASKED_MIN", 0)
    make, x, op_types, last = CASES[case]
    model = make().eval()
    randomize_(model)
    masks = _masks(model, x, op_types, last)
    attempts = []
    real = compact_module._apply_checked
    monkeypatch.setattr(compact_module, "_apply_checked",
                        lambda *a: attempts.append((a[1].graph.measured, len(a[1].unmasked))) or real(*a))
    oracle(model, masks, x)
    assert len(attempts) == 1
    assert attempts[0][1] > 0 or attempts[0][0]  # (a plan from the pruning trace leaves some weight unmasked)


@pytest.mark.parametrize("fine", [False, True], ids=["channels", "channels+fine"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_the_plan_calls_whole_cut_to_all_kept(case, fine):
    """``plan.whole`` lets compact_ skip cutting a mask: cut like its parameter, every such mask keeps everything
    (with single weights masked on top of the channels, the masks that still hold a zero are not in it)."""
    make, x, op_types, last = CASES[case]
    model = make().eval()
    masks = _masks(model, x, op_types, last)
    if fine:
        g = torch.Generator().manual_seed(1)
        masks = {n: m & (torch.rand(m.shape, generator=g) > 0.3) if m.dim() > 1 else m for n, m in masks.items()}
    for measure in (False, True):
        plan = plan_compaction(model, masks, example_inputs=x, measure=measure)
        cut = cut_masks(model, {n: masks[n] for n in plan.whole if n in masks}, plan.modules)
        assert all(bool(m.all()) for m in cut.values()), sorted(n for n, m in cut.items() if not m.all())
        if not fine:
            assert plan.whole  # (channel masks: most are whole)
