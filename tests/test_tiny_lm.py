"""One-shot LM pruning: SparseGPT's solver, the layer-by-layer driver, perplexity, the cached tiny LLaMA."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from slimtorch.errors import ConfigError
from slimtorch.masks import is_masked
from slimtorch.models.tiny_lm import (
    TinyLMConfig,
    build_model,
    calibration_batches,
    load_or_train_lm,
    perplexity,
)
from slimtorch.prune.oneshot import (
    ONE_SHOT_METHODS,
    apply_one_shot_,
    decoder_layers,
    one_shot_prune,
)
from slimtorch.prune.sparsegpt import sparsegpt_solve

TINY = TinyLMConfig(vocab_size=64, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64, seq_len=16)


def _correlated_inputs(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols) @ torch.randn(cols, cols) * 0.5 + torch.randn(rows, cols)


def test_sparsegpt_single_removal_is_the_least_squares_update():
    # Two inputs, the first weight tiny: it is pruned, and the OBS step moves the second weight to the
    # least-squares optimum of w' * x1 ~ w . x (exact for one removal).
    x = torch.randn(200, 2)
    x[:, 1] += 0.8 * x[:, 0]
    w = torch.tensor([[0.1, 2.0]])
    new_w, keep = sparsegpt_solve(w, 2 * x.T @ x / 200, sparsity=0.5, block_size=2, damp=0.0)
    target = (x @ w.T).squeeze(1)
    optimum = (target @ x[:, 1]) / (x[:, 1] @ x[:, 1])
    assert keep.tolist() == [[False, True]]
    assert new_w[0, 0] == 0
    torch.testing.assert_close(new_w[0, 1], optimum, rtol=1e-5, atol=1e-6)
    assert w.tolist() == [[pytest.approx(0.1), 2.0]]  # pure: the input weight is untouched


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_on_reconstruction(pattern):
    x = _correlated_inputs(512, 64)
    w = torch.randn(32, 64)
    new_w, keep = sparsegpt_solve(w, 2 * x.T @ x / 512, sparsity=0.5, pattern=pattern, block_size=16)
    assert keep.sum() == w.numel() // 2
    assert bool((new_w[~keep] == 0).all())
    if pattern is None:
        mag = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
    else:
        groups = w.abs().reshape(32, 16, 4)  # (rows, groups of 4 inputs, 4)
        top = groups.topk(2, dim=2).indices
        mag = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True).reshape(32, 64)
        assert bool((keep.reshape(32, 16, 4).sum(dim=2) == 2).all())
    err_sparsegpt = (x @ (w - new_w).T).pow(2).mean()
    err_magnitude = (x @ (w - w * mag).T).pow(2).mean()
    assert err_sparsegpt < 0.8 * err_magnitude


def test_sparsegpt_rejects_bad_arguments():
    w, h = torch.randn(4, 6), torch.eye(6)
    with pytest.raises(ConfigError, match="Hessian"):
        sparsegpt_solve(w, torch.eye(5))
    with pytest.raises(ConfigError, match="sparsity"):
        sparsegpt_solve(w, h, sparsity=1.0)
    with pytest.raises(ConfigError, match="2:4"):
        sparsegpt_solve(w, h, pattern=(2, 4))  # 6 inputs are not a multiple of 4


@pytest.mark.parametrize(("method", "pattern"), [("magnitude", None), ("sparsegpt", None), ("sparsegpt", "2:4"),
                                                 ("magnitude", "2:4")])
def test_one_shot_prunes_every_decoder_linear_and_is_pure(method, pattern):
    model = build_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, TINY.vocab_size, (8, TINY.seq_len))
    result = one_shot_prune(model, calib, method=method, sparsity=0.5, pattern=pattern, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(result.masks) == TINY.layers * 7  # q, k, v, o, gate, up, down in every layer
    for name, mask in result.masks.items():
        assert abs(mask.float().mean().item() - 0.5) < 0.02, name
        assert bool((result.weights[name][~mask] == 0).all())
        if pattern == "2:4":
            assert bool((mask.reshape(mask.shape[0], -1, 4).sum(dim=2) == 2).all())
    apply_one_shot_(model, result)
    assert is_masked(model)
    down = model.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(down.detach(), result.weights["model.layers.1.mlp.down_proj.weight"])


def test_one_shot_layers_see_the_pruned_previous_layers(monkeypatch):
    # Layer 1 must be measured on the outputs of the *pruned* layer 0: record the input statistics each
    # q_proj sees, with layer 0 kept dense (sparsity 0) and pruned hard (sparsity 0.9).
    seen: list[torch.Tensor] = []

    def recording(weight, xtx, tokens, sparsity, pattern):
        if weight.shape == (TINY.hidden_size, TINY.hidden_size) and len(seen) % 2 == 0:
            seen.append(xtx.clone())  # q_proj comes first in each layer
        elif weight.shape == (TINY.hidden_size, TINY.hidden_size):
            seen.append(None)  # o_proj
        keep = weight.abs() > weight.abs().flatten().kthvalue(max(1, int(weight.numel() * sparsity))).values
        return (weight * keep, keep) if sparsity else (weight, torch.ones_like(weight, dtype=torch.bool))

    monkeypatch.setitem(ONE_SHOT_METHODS, "recording", recording)
    model = build_model(TINY)
    calib = torch.randint(0, TINY.vocab_size, (8, TINY.seq_len))
    one_shot_prune(model, calib, method="recording", sparsity=0.0)
    dense_layer0, dense_layer1 = seen[0], seen[2]
    seen.clear()
    one_shot_prune(model, calib, method="recording", sparsity=0.9)
    torch.testing.assert_close(seen[0], dense_layer0)  # layer 0 sees the same (unpruned) embeddings
    assert not torch.allclose(seen[2], dense_layer1, rtol=1e-3)  # layer 1 sees the pruned layer 0
    assert decoder_layers(model)[0] == "model.layers"


def test_one_shot_rejects_bad_arguments():
    model = build_model(TINY)
    calib = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len))
    with pytest.raises(ConfigError, match="available"):
        one_shot_prune(model, calib, method="obs")
    with pytest.raises(ConfigError, match="N:M"):
        one_shot_prune(model, calib, pattern="fine")
    with pytest.raises(ConfigError, match="decoder layers"):
        one_shot_prune(torch.nn.Linear(2, 2), calib)


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    model = build_model(TINY)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied with the embedding: every logit is 0, every token equally likely
    tokens = torch.randint(0, TINY.vocab_size, (100,))
    assert perplexity(model, tokens, seq_len=TINY.seq_len) == pytest.approx(TINY.vocab_size, rel=1e-5)


def test_calibration_batches_are_windows_of_the_stream():
    tokens = torch.arange(1000)
    batch = calibration_batches(tokens, num=5, seq_len=10, seed=3)
    assert batch.shape == (5, 10)
    assert bool((batch[:, 1:] - batch[:, :-1] == 1).all())
    assert torch.equal(batch, calibration_batches(tokens, num=5, seq_len=10, seed=3))
    with pytest.raises(ConfigError, match="seq_len"):
        calibration_batches(tokens[:5], num=1, seq_len=10)


def test_tiny_lm_config_validates_and_round_trips():
    assert TinyLMConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ConfigError, match="kv_heads"):
        TinyLMConfig(heads=8, kv_heads=3)
    with pytest.raises(ConfigError, match="steps"):
        TinyLMConfig(steps=0)
    with pytest.raises(ConfigError, match="unknown"):
        TinyLMConfig.from_dict({"layer": 2})


@pytest.mark.slow
def test_trained_lm_learns_and_is_cached(tmp_path):
    pytest.importorskip("gensim")
    cfg = TinyLMConfig(vocab_size=512, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64,
                       seq_len=32, batch_size=8, steps=60, lr=1e-2)
    lm = load_or_train_lm(cfg, root=tmp_path)
    assert lm.record["val_perplexity"] < 0.5 * cfg.vocab_size  # far better than guessing
    again = load_or_train_lm(cfg, root=tmp_path)  # from the cache, not trained again
    assert again.record == {"config": cfg.to_dict(), **lm.record}
    for a, b in zip(lm.model.parameters(), again.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not math.isnan(lm.record["final_train_loss"])


def test_wanda_keeps_the_largest_weight_times_input_norm_of_each_row():
    from slimtorch.prune.criteria import CRITERIA

    if "wanda" not in CRITERIA:
        pytest.skip("the wanda criterion is not registered in this installation")
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 0.5]])
    xtx = torch.diag(torch.tensor([16.0, 1.0, 4.0, 9.0], dtype=torch.float64))  # input norms 4, 1, 2, 3
    # scores: row 0 -> 4, 1, 2, 3 (keep inputs 0 and 3); row 1 -> 16, 3, 4, 1.5 (keep inputs 0 and 2)
    new_weight, keep = ONE_SHOT_METHODS["wanda"](weight, xtx, 10, 0.5, None)
    assert keep.tolist() == [[True, False, False, True], [True, False, True, False]]
    assert new_weight.tolist() == [[1.0, 0.0, 0.0, 1.0], [4.0, 0.0, 2.0, 0.0]]
