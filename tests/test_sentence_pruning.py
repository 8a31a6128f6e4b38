"""Pruning a sentence-embedding encoder while distilling it: the pieces (cached teacher, unit scores, layer
dropping) and the one command that turns a sentence-transformers folder into a smaller one."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtorch.cli.main import main  # noqa: E402
from slimtorch.errors import ConfigError  # noqa: E402
from slimtorch.integrations.hf.compaction import compact_hf_, unit_masks  # noqa: E402
from slimtorch.integrations.hf.importance import (  # noqa: E402
    UnitScores,
    choose_units,
    drop_layers_,
    layer_influence,
)
from slimtorch.integrations.hf.units import find_blocks  # noqa: E402
from slimtorch.recover.transformer_distill import (  # noqa: E402
    DistilWeights,
    EncoderDistiller,
    TeacherCache,
    mean_pool,
    pack_tokens,
)


def _bert(layers: int = 3, vocab: int = 60) -> transformers.BertModel:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=vocab)
    return transformers.BertModel(cfg).eval()


def _inputs(n: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 4:] = 0  # one padded sentence
    return {"input_ids": torch.randint(1, 60, (n, length), generator=gen), "attention_mask": mask}


def test_the_teacher_is_its_own_perfect_student_and_the_cache_runs_it_once():
    teacher = _bert()
    student = copy.deepcopy(teacher)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    loss = EncoderDistiller(TeacherCache(teacher))
    x, y = pack_tokens(_inputs()), torch.arange(4)
    assert float(loss(student, x, y).detach()) == pytest.approx(0.0, abs=1e-5)
    loss(student, x, y)
    assert len(calls) == 1 and len(loss.cache) == 4


def test_a_shallower_student_matches_the_teacher_layers_it_stands_for():
    teacher = _bert()
    student = copy.deepcopy(teacher)
    assert drop_layers_(student, [1]) == [0, 2]
    x, y = pack_tokens(_inputs()), torch.arange(4)
    cache = TeacherCache(teacher)
    mapped = EncoderDistiller(cache, layer_map=[0, 2], weights=DistilWeights(embedding=0, cosine=0, hidden=1))
    # student layer 0 is teacher layer 0: its term is zero, so the loss is half of layer 2's relative error
    with torch.no_grad():
        inputs = {"input_ids": x[:, 0], "attention_mask": x[:, 1]}
        s = student(**inputs, output_hidden_states=True).hidden_states[2]
        t = teacher(**inputs, output_hidden_states=True).hidden_states[3]
        m = x[:, 1, :, None].float()
        expected = 0.5 * float(((s - t).pow(2) * m).sum() / (t.pow(2) * m).sum())
    assert float(mapped(student, x, y).detach()) == pytest.approx(expected, rel=1e-2)
    with pytest.raises(ConfigError, match="layer_map"):
        EncoderDistiller(cache, layer_map=[0, 5])(student, x, y)


def test_mean_pool_leaves_padding_out():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 0.0]]))


@pytest.mark.parametrize("criterion", ["movement", "taylor", "gradient", "l1"])
def test_unit_scores_cover_every_head_and_neuron(criterion):
    model = _bert().train()
    scores = UnitScores(model, criterion)
    for _ in range(2):
        model.zero_grad()
        model(**_inputs()).last_hidden_state.pow(2).mean().backward()
        scores.after_backward(None)
    heads, ffn = scores.scores("attention"), scores.scores("ffn")
    assert sorted(heads) == [f"encoder.layer.{i}.attention" for i in range(3)]
    assert all(v.shape == (4,) for v in heads.values()) and all(v.shape == (64,) for v in ffn.values())
    assert any(bool((v != 0).any()) for v in heads.values())


def test_taylor_score_is_the_squared_gradient_of_a_gate_on_the_unit():
    model = _bert(layers=1).train()
    torch.manual_seed(3)
    scores = UnitScores(model, "taylor", kinds=("ffn",))
    inputs = _inputs()
    gate = torch.ones(64, requires_grad=True)
    act = model.encoder.layer[0].intermediate
    handle = act.register_forward_hook(lambda mod, args, out: out * gate)
    model(**inputs).last_hidden_state.sum().backward()
    handle.remove()
    scores.after_backward(None)
    torch.testing.assert_close(scores.scores()["encoder.layer.0"].float(), gate.grad.pow(2), rtol=1e-3, atol=1e-9)


def test_choose_units_keeps_what_is_gone_gone_and_a_head_in_every_layer():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.1, 0.2, 0.3])}
    assert choose_units(scores, 1, per_layer=True, removed={"a": [2]}) == {"a": [2], "b": [0]}
    assert choose_units(scores, 4, per_layer=False) == {"a": [0, 1], "b": [0, 1]}
    with pytest.raises(ConfigError, match="only 4"):
        choose_units(scores, 5, per_layer=False)


def test_dropping_the_least_influential_layer():
    model = _bert()
    with torch.no_grad():  # layer 1 adds nothing: its attention and FFN outputs are zero
        for p in (model.encoder.layer[1].attention.output.dense, model.encoder.layer[1].output.dense):
            p.weight.zero_()
            p.bias.zero_()
    influence = layer_influence(model, [_inputs()])
    assert min(range(3), key=influence.__getitem__) == 1
    before = model(**_inputs()).last_hidden_state
    drop_layers_(model, [1])
    assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2
    torch.testing.assert_close(model(**_inputs()).last_hidden_state, before, rtol=1e-4, atol=1e-4)


def test_layers_cannot_be_dropped_after_compaction_nor_all_of_them():
    model = _bert()
    with pytest.raises(ConfigError, match="keeping at least one"):
        drop_layers_(model, [0, 1, 2])
    compact_hf_(model, unit_masks(model, {"encoder.layer.0.attention": [1]}))
    with pytest.raises(ConfigError, match="before compacting"):
        drop_layers_(model, [2])
    assert len(model.encoder.layer) == 3


@pytest.fixture(scope="module")
def tiny_sentence_folder(tmp_path_factory):
    """A sentence-transformers folder of a random 3-layer BERT with all-MiniLM-L6-v2's tokenizer."""
    st_lib = pytest.importorskip("sentence_transformers")
    from slimtorch.models.minilm import minilm_path

    root = tmp_path_factory.mktemp("st")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    bert = _bert(vocab=tokenizer.vocab_size)
    bert.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    try:  # where recent releases keep the modules; older ones have them in sentence_transformers.models
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    st = st_lib.SentenceTransformer(modules=[modules.Transformer(str(root / "hf")), modules.Pooling(32, "mean"),
                                             modules.Normalize()], device="cpu")
    st.save(str(root / "st"))
    return root / "st"


def _embed(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    return torch.nn.functional.normalize(pooled, dim=-1)


SENTENCES = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the announcement."]


def test_a_folder_with_fewer_heads_opens_with_our_loader_and_computes_the_same(tiny_sentence_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    from slimtorch.integrations.hf.sentence import load_sentence_folder, needs_our_loader, save_sentence_folder

    st = load_sentence_folder(tiny_sentence_folder)
    model = copy.deepcopy(st[0].model)
    compact_hf_(model, unit_masks(model, {"encoder.layer.0.attention": [1, 2], "encoder.layer.2": range(9)}))
    save_sentence_folder(model, st, tmp_path / "heads")
    assert needs_our_loader(model) and st[0].model is not model  # the template keeps its own transformer
    again = load_sentence_folder(tmp_path / "heads")
    torch.testing.assert_close(again.encode(SENTENCES, convert_to_tensor=True), _embed(model, st.tokenizer, SENTENCES))
    with pytest.raises(RuntimeError):  # the config cannot say that layer 0 has 2 heads of width 8
        SentenceTransformer(str(tmp_path / "heads"), device="cpu")


def test_a_folder_with_fewer_layers_opens_with_sentence_transformers_itself(tiny_sentence_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    from slimtorch.integrations.hf.sentence import load_sentence_folder, needs_our_loader, save_sentence_folder

    st = load_sentence_folder(tiny_sentence_folder)
    model = copy.deepcopy(st[0].model)
    drop_layers_(model, [1])
    save_sentence_folder(model, st, tmp_path / "layers")
    assert not needs_our_loader(model)
    plain = SentenceTransformer(str(tmp_path / "layers"), device="cpu")
    torch.testing.assert_close(plain.encode(SENTENCES, convert_to_tensor=True), _embed(model, st.tokenizer, SENTENCES))


def test_prune_sentence_command_writes_a_smaller_folder_and_resumes(tiny_sentence_folder, tmp_path, capsys):
    from slimtorch.integrations.hf.sentence import load_sentence_folder

    source_files = sorted(p.name for p in tiny_sentence_folder.iterdir())
    args = ["prune-sentence", str(tiny_sentence_folder), str(tmp_path / "out"), "--heads", "0.5", "--ffn", "0.25",
            "--drop-layers", "1", "--steps", "4", "--batch-size", "4", "--prune-every", "1", "--work",
            str(tmp_path / "work"), "--threads", "1"]
    assert main(args) == 0
    assert "open it with slimtorch.integrations.hf.sentence.load_sentence_folder" in capsys.readouterr().out
    out = load_sentence_folder(tmp_path / "out")
    model = out[0].model
    assert model.config.num_hidden_layers == 2
    assert sum(s.units for s in find_blocks(model).values() if s.kind == "attention") == 4
    first = out.encode(SENTENCES, convert_to_tensor=True)
    assert sorted(p.name for p in tiny_sentence_folder.iterdir()) == source_files  # the source is only read
    assert (tmp_path / "work" / "pruned" / "slimtorch_workflow.json").is_file()
    assert main([*args[:2], str(tmp_path / "again"), *args[3:], "--resume"]) == 0  # all done: loaded, not redone
    torch.testing.assert_close(load_sentence_folder(tmp_path / "again").encode(SENTENCES, convert_to_tensor=True),
                               first)
    assert main([*args, "--resume", "--heads", "0.25"]) == 2  # other settings than the work folder's
    assert "other settings" in capsys.readouterr().err


def test_the_similarity_term_reads_relations_between_sentences_only():
    """The batch-similarity loss is zero for the teacher itself and for any rotation of its embeddings (their
    pairwise cosines are the same), where the embedding terms are not; it is positive for another model."""
    teacher = _bert()
    x, y = pack_tokens(_inputs()), torch.arange(4)
    only_relations = EncoderDistiller(TeacherCache(teacher), weights=DistilWeights(
        embedding=0.0, cosine=0.0, hidden=0.0, similarity=1.0))
    assert float(only_relations(copy.deepcopy(teacher), x, y).detach()) == pytest.approx(0.0, abs=1e-6)
    rotated = copy.deepcopy(teacher)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))  # (32, 32) orthogonal
    with torch.no_grad():  # the last layer's output LayerNorm, rotated: every token state turns by q
        norm = rotated.encoder.layer[-1].output.LayerNorm
        rotated.encoder.layer[-1].output.LayerNorm = torch.nn.Sequential(norm, torch.nn.Linear(32, 32, bias=False))
        rotated.encoder.layer[-1].output.LayerNorm[1].weight.copy_(q)
    assert float(only_relations(rotated, x, y).detach()) == pytest.approx(0.0, abs=1e-5)
    embedding_only = EncoderDistiller(TeacherCache(teacher), weights=DistilWeights(hidden=0.0))
    assert float(embedding_only(rotated, x, y).detach()) > 0.1
    other = _bert()
    torch.nn.init.normal_(other.encoder.layer[-1].output.dense.weight, std=0.5)
    assert float(only_relations(other, x, y).detach()) > 1e-6  # (random BERTs pool to near-parallel vectors)
    with pytest.raises(ConfigError, match="similarity"):
        DistilWeights(similarity=-1.0)


def test_the_workflow_passes_the_similarity_weight_and_old_settings_still_read():
    from slimtorch.recipes.minilm import WorkflowConfig

    cfg = WorkflowConfig(similarity_weight=2.0)
    assert WorkflowConfig.from_dict(cfg.to_dict()) == cfg
    assert "similarity_weight" not in WorkflowConfig().to_dict()  # what a run before the field recorded
    with pytest.raises(ConfigError, match="similarity"):
        WorkflowConfig(similarity_weight=-0.5)
