"""compact_ fails cleanly and checks honestly: a failure on any path leaves the model exactly as it was, the check
cannot be fooled by non-finite values, tied weights fail with a typed error that names them, and a warning says
why masked channels stayed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import slimtorch.compact.compact as compact_module
from adversarial import assert_same_state, fails_cleanly, model_state
from nets import randomize_
from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.compact.surgery import SHRINKS
from slimtorch.errors import CompactionError, ConfigError, SlimWarning

X = torch.randn(2, 3, 8, 8)


class _Net(nn.Module):
    """Two convs and a classifier behind a hard-coded reshape (a call compaction rewrites); counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6 * 4 * 4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).reshape(x.shape[0], 6 * 4 * 4))


def _fail_check(monkeypatch, model: nn.Module) -> None:
    real = compact_module._apply

    def apply(*args, **kwargs):
        real(*args, **kwargs)
        raise CompactionError("the compacted model does not reproduce the masked one (injected); restored")

    monkeypatch.setattr(compact_module, "_apply", apply)


def _fail_surgery(monkeypatch, model: nn.Module) -> None:
    real = SHRINKS["conv"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    def shrink(module, keeps, options):
        real(module, keeps, options)
        if any(module is c for c in convs):  # (not on the stand-ins that cut the masks the model keeps)
            raise RuntimeError("surgery failed (injected)")

    monkeypatch.setitem(SHRINKS, "conv", shrink)


def _fail_rewrites(monkeypatch, model: nn.Module) -> None:
    def needed(*args, **kwargs):
        raise RuntimeError("the rewritten calls failed (injected)")

    monkeypatch.setattr(compact_module, "_needed_fixes", needed)


FAILURES = {"check": _fail_check, "surgery": _fail_surgery, "rewrites": _fail_rewrites}


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failure_on_the_first_attempt_and_the_retry_restores_everything(failure, masked, monkeypatch):
    """Masks from compute_masks are planned from the pruning trace first, then, when that attempt fails, from a
    measured run: both fail here, and the model (parameters, buffers, attributes, hooks, outputs) is as before."""
    model = _Net().eval()
    randomize_(model)
    masks = compute_masks(model, [{"op_names": ["a", "b"], "sparse_ratio": 0.5}], example_inputs=X)
    if masked:
        apply_masks_(model, masks)
    seen = []
    model.a.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fresh = torch.randn_like(X)
    with torch.no_grad():
        before = model(fresh)
    params = list(model.parameters())
    attempts = []
    real = compact_module._apply_checked
    monkeypatch.setattr(compact_module, "_apply_checked", lambda *a: attempts.append(a[1].graph.measured) or real(*a))
    FAILURES[failure](monkeypatch, model)
    fails_cleanly(lambda: compact_(model, masks, example_inputs=X), CompactionError, "restored", models=[model])
    assert attempts == ([True] if masked else [False, True])  # (unmasked: planned from the pruning trace first)
    assert list(model.parameters()) == params and not hasattr(model, "slimtorch_compaction")
    with torch.no_grad():
        assert torch.equal(model(fresh), before)
    assert seen[-1] == (2, 8, 6, 6)  # the user's hook still runs on the full layer


def test_a_failing_after_compaction_hook_restores_the_model(monkeypatch):
    """A hook run after the surgery (e.g. the Hugging Face config update) that fails leaves the model as it was."""
    model = _Net().eval()
    masks = compute_masks(model, [{"op_names": ["a"], "sparse_ratio": 0.5}], example_inputs=X)

    def hook(m):
        raise RuntimeError("hook failed (injected)")

    monkeypatch.setattr(compact_module, "AFTER_COMPACTION", [hook])
    before = model_state(model)
    with pytest.raises(RuntimeError, match="injected"):
        compact_(model, masks, example_inputs=X)
    assert_same_state(before, model_state(model))
    assert not hasattr(model, "slimtorch_compaction")


def test_a_failed_plan_leaves_what_the_forward_changed_undone():
    model = _Net().eval()
    empty = {"a.weight": torch.zeros_like(model.a.weight, dtype=torch.bool)}
    fails_cleanly(lambda: compact_(model, empty, example_inputs=X), CompactionError, "cannot be emptied",
                  models=[model])
    assert model.calls == 0


def _surgery_writes_nan(monkeypatch) -> None:
    real = SHRINKS["linear"]

    def shrink(module, keeps, options):
        real(module, keeps, options)
        module.weight.data[0, 0] = float("nan")

    monkeypatch.setitem(SHRINKS, "linear", shrink)


def test_a_nan_in_the_compacted_outputs_fails_the_check(monkeypatch):
    """``max(0.0, nan)`` is 0.0: a difference that is NaN must count as a mismatch, not as none."""
    model = _Net().eval()
    masks = compute_masks(model, [{"op_names": ["b"], "sparse_ratio": 0.5}], example_inputs=X)
    _surgery_writes_nan(monkeypatch)
    fails_cleanly(lambda: compact_(model, masks, example_inputs=X), CompactionError, "does not reproduce",
                  models=[model])


def test_a_nan_in_the_example_inputs_is_refused_and_named():
    """One NaN in the example inputs would disable the check (and the measured values): refused up front."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

        def forward(self, x, scale):
            return self.b(torch.roll(self.a(x), 1, dims=1)) * scale

    model = TwoInputs().eval()
    x, scale = X.clone(), torch.ones(1)
    masks = compute_masks(model, [{"op_names": ["a"], "sparse_ratio": 0.5}], example_inputs=(x, scale))
    x[0, 0, 0, 0] = float("nan")
    for verify in (True, False):
        fails_cleanly(lambda v=verify: compact_(model, masks, example_inputs=(x, scale), verify=v), ConfigError,
                      "example_inputs[0] holds 1 NaN", models=[model])
    fails_cleanly(lambda: compact_(model, masks, example_inputs={"x": x, "scale": scale}), ConfigError,
                  "example_inputs['x']", models=[model])


def test_non_finite_outputs_of_the_masked_model_are_refused_and_the_cause_named():
    model = _Net().eval()
    masks = compute_masks(model, [{"op_names": ["a"], "sparse_ratio": 0.5}], example_inputs=X)
    infinite = X.clone()
    infinite[1, 2, 3, 4] = float("inf")
    fails_cleanly(lambda: compact_(model, masks, example_inputs=infinite), CompactionError,
                  "non-finite values at example_inputs", models=[model])
    kept = int(torch.nonzero(masks["a.weight"].flatten(1).any(1))[0])
    with torch.no_grad():
        model.b.weight[0, kept, 0, 0] = float("inf")  # (a weight that stays: not masked)
    fails_cleanly(lambda: compact_(model, masks, example_inputs=X), CompactionError,
                  "although the example inputs are finite", models=[model])


@pytest.mark.parametrize("verify", [True, False])
def test_nan_and_inf_in_pruned_weights_are_zeroed_not_multiplied(verify):
    """Masking zeroes a pruned weight whatever it holds (NaN * 0 is NaN): the masked model is finite and the
    compacted one computes the same."""
    model = _Net().eval()
    randomize_(model)
    masks = compute_masks(model, [{"op_names": ["a"], "sparse_ratio": 0.5}], example_inputs=X)
    gone = torch.nonzero(~masks["a.weight"].flatten(1).any(1)).flatten()
    with torch.no_grad():
        model.a.weight[gone[0]] = float("nan")
        model.a.bias[gone[0]] = float("inf")
        model.b.weight[:, gone[1]] = float("-inf")
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    compact_(model, masks, example_inputs=X, verify=verify)
    fresh = torch.randn_like(X)
    with torch.no_grad():
        assert bool(ref(fresh).isfinite().all())
        torch.testing.assert_close(model(fresh), ref(fresh))
    assert model.a.out_channels == 8 - gone.numel()


class _TiedEmbedding(nn.Module):
    """A language-model head that shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix = nn.Embedding(10, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("verify", [True, False])
def test_tied_weights_that_would_lose_channels_fail_with_their_names(verify):
    model = _TiedEmbedding().eval()
    tokens = torch.randint(0, 10, (2, 5))
    pruned = compute_masks(model, [{"op_types": ["Linear", "Embedding"], "sparse_ratio": 0.5}],
                           example_inputs=tokens)
    keep = torch.arange(6) % 2 == 0
    by_hand = {"mix.weight": keep[:, None].expand(6, 6).clone(), "mix.bias": keep}
    # a pruner leaves the channels of the tied weight alone; masks that ask for them anyway are refused
    assert bool(pruned.get("embed.weight", torch.ones(1, dtype=torch.bool)).all())
    for masks in ({**by_hand, "embed.weight": keep.expand(10, 6).clone()},
                  {**by_hand, "head.weight": keep.expand(10, 6).clone()}):
        error = fails_cleanly(lambda m=masks: compact_(model, m, example_inputs=tokens, verify=verify),
                              CompactionError, "'embed.weight' = 'head.weight'", models=[model])
        assert "untie" in str(error) and "mat1" not in str(error)


def test_tied_weights_whose_channels_stay_compact_to_the_masked_model():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(self.a(x).relu()).relu())

    model, x = Tied().eval(), torch.randn(3, 6)
    masks = compute_masks(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], example_inputs=x)
    assert "b.weight" in masks  # (a mask under the second name of the tied weight is accepted)
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compact_(model, masks, example_inputs=x)
    assert model.a.weight is model.b.weight
    fresh = torch.randn(4, 6)
    torch.testing.assert_close(model(fresh), ref(fresh))


def test_whole_channels_kept_by_a_residual_add_are_named_with_the_reason():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.c(y + self.b(y))

    model = Residual().eval()
    keep = torch.ones(8, dtype=torch.bool)
    keep[:3] = False
    masks = {"b.weight": keep[:, None, None, None].expand(8, 8, 3, 3).clone(), "b.bias": keep}
    with pytest.warns(SlimWarning, match=r"removed no channel: the masks zero whole channels that must stay: 3 output "
                                         r"channels of 'b.weight' \(coupled, by a residual add.* to channels that "
                                         r"'a.weight', 'c.weight' keep\)"):
        compact_(model, masks, example_inputs=torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("seed", range(5))
def test_a_roll_over_pruned_channels_compacts_exactly_without_the_check(seed):
    """``roll`` moves channel c to (c + shift) % C: with channels gone the shift is recounted, not kept."""

    class Rolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(16, 4, 3)

        def forward(self, x):
            y = self.c1(x)
            return self.c2(torch.cat([y, torch.roll(y, 2, 1)], 1))

    torch.manual_seed(seed)
    model = Rolled().eval()
    masks = compute_masks(model, [{"op_names": ["c1"], "sparse_ratio": 0.5}], example_inputs=X)
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    compact_(model, masks, example_inputs=X, verify=False)
    assert model.c1.out_channels == 4
    fresh = torch.randn_like(X)
    torch.testing.assert_close(model(fresh), ref(fresh))
