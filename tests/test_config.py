import pytest

from slimtorch.config import Granularity, PruneTarget, load_config_list, parse_config_list
from slimtorch.errors import ConfigError


def test_nni_keys_and_aliases_parse():
    cfg = parse_config_list(
        [
            {"op_types": ["Conv2d"], "sparsity_per_layer": 0.5},
            {"op_names": ["fc"], "sparsity": 0.25},
            {"op_partial_names": ["layer"], "total_sparsity": 0.6, "max_sparsity_per_layer": 0.9},
            {"op_types": ["Linear"], "exclude_op_names": ["fc2"], "sparse_ratio": 0.3, "granularity": "filter"},
            {"op_names": ["fc2"], "exclude": True},
        ]
    )
    assert cfg[0].sparse_ratio == 0.5 and cfg[0].op_types == ("Conv2d",)
    assert cfg[1].sparse_ratio == 0.25
    assert cfg[2].total_sparsity == 0.6 and cfg[2].max_sparse_ratio == 0.9
    assert cfg[3].granularity == Granularity(kind="out_channel") and cfg[3].exclude_op_names == ("fc2",)
    assert cfg[4].exclude and cfg[4].sparsity is None


def test_round_trip_through_dict():
    entries = [
        {"op_types": ["Linear"], "sparse_ratio": 0.3, "granularity": "2:4"},
        {"op_names": ["a", "b"], "total_sparsity": 0.5, "max_sparse_ratio": 0.8, "granularity": [4, 4]},
        {"op_types": ["Conv2d"], "sparse_threshold": 0.1, "granularity": "kernel"},
    ]
    entries[0]["sparse_ratio"] = 0.5  # 2:4 fixes 50%
    for entry in entries:
        target = PruneTarget.from_dict(entry)
        assert PruneTarget.from_dict(target.to_dict()) == target
    assert PruneTarget.from_dict(entries[1]).to_dict()["granularity"] == [4, 4]


def test_targets_are_frozen():
    target = PruneTarget(op_types=("Linear",), sparse_ratio=0.5)
    with pytest.raises(AttributeError):
        target.sparse_ratio = 0.9


@pytest.mark.parametrize("bad", [1.5, 1.0, -0.1, float("nan"), "0.5", True])
def test_sparsity_out_of_range_is_rejected(bad):
    with pytest.raises(ConfigError, match=r"sparse_ratio.*\[0, 1\)"):
        parse_config_list([{"op_types": ["Linear"], "sparse_ratio": bad}])


def test_unknown_key_names_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_config_list([{"op_types": ["Linear"], "sparse_ration": 0.5}])
    message = str(err.value)
    assert "sparse_ration" in message and "'sparse_ratio'" in message and "entry 0" in message


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"sparse_ratio": 0.5}, "at least one selector"),
        ({"op_types": "Linear", "sparse_ratio": 0.5}, "write \\['Linear'\\]"),
        ({"op_types": ["Linear"]}, "exactly one of"),
        ({"op_types": ["Linear"], "sparse_ratio": 0.5, "total_sparsity": 0.5}, "exactly one of"),
        ({"op_names": ["fc"], "exclude": True, "sparse_ratio": 0.5}, "prunes nothing"),
        ({"op_types": ["Linear"], "sparse_ratio": 0.5, "max_sparse_ratio": 0.7}, "with 'total_sparsity'"),
        ({"op_types": ["Linear"], "sparse_ratio": 0.3, "granularity": "2:4"}, "fixes the sparsity at 0.5"),
        ({"op_types": ["Linear"], "sparse_ratio": 0.3, "granularity": "diagonal"}, "unknown granularity"),
        ({"op_types": ["Linear"], "sparse_ratio": 0.3, "granularity": "4:2"}, "0 < N < M"),
        ({"op_types": ["Linear"], "sparse_ratio": 0.3, "exclude": "yes"}, "True or False"),
        ({"op_types": ["Linear"], "sparse_threshold": -1}, "sparse_threshold"),
    ],
)
def test_bad_entries_explain_the_fix(entry, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config_list([entry])


@pytest.mark.parametrize("bad", [{}, [], "op_types: [Linear]", None, [{"op_names": ["x"], "exclude": True}]])
def test_bad_config_lists(bad):
    with pytest.raises(ConfigError):
        parse_config_list(bad)


def test_n_m_granularity_implies_sparsity():
    target = PruneTarget.from_dict({"op_types": ["Linear"], "granularity": "2:4"})
    assert target.sparsity == 0.5
    assert Granularity.parse("1:4").implied_sparsity == 0.75


def test_yaml_text_and_file(tmp_path):
    text = "config_list:\n  - op_types: [Conv2d]\n    sparse_ratio: 0.5\n  - op_names: [fc2]\n    exclude: true\n"
    from_text = load_config_list(text)
    path = tmp_path / "prune.yaml"
    path.write_text(text)
    assert load_config_list(path) == from_text
    assert from_text[0].sparse_ratio == 0.5 and from_text[1].exclude


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_list(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- op_types: [Conv2d\n  sparse_ratio: 0.5\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_list(bad)
