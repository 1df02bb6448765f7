import pytest

from umlcore.config import PRESETS, UMLConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(name):
    cfg = UMLConfig.preset(name)
    assert UMLConfig.from_json(cfg.to_json()) == cfg


def test_preset_override_and_unknown_preset():
    assert UMLConfig.preset("small", in_channels=1).in_channels == 1
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        UMLConfig.preset("huge")


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"num_seg_labels": 1}, "num_seg_labels must be >= 2"),
        ({"in_channels": 0}, "in_channels must be >= 1"),
        ({"seg_widths": (8, 16, 32)}, "seg_widths must be 4 positive integers"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"cls_pool": "max"}, "cls_pool must be one of 'avg', 'avg\\+max', 'avg\\+max\\+lesion'"),
    ],
)
def test_invalid_config_names_the_field(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        UMLConfig(**kwargs)


def test_unknown_field_in_dict_is_refused():
    d = UMLConfig().to_dict()
    d["depth"] = 5
    with pytest.raises(ValueError, match="unknown architecture fields \\['depth'\\]"):
        UMLConfig.from_dict(d)


def test_cls_pool_defaults_to_the_papers_average_and_old_configs_still_load():
    assert UMLConfig().cls_pool == "avg" and UMLConfig.preset("paper").cls_pool == "avg"
    assert UMLConfig.preset("small").cls_pool == "avg+max+lesion"
    old = UMLConfig.preset("small").to_dict()
    del old["cls_pool"]  # a model.json written before the field existed
    assert UMLConfig.from_dict(old).cls_pool == "avg"
