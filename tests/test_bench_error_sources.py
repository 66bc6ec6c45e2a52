"""bench.error_sources: how MiniLM's tensor names are grouped for the per-group loss tables."""

from bench.error_sources import group_of, groups_of

NAMES = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
         "embeddings.LayerNorm.weight",
         "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias",
         "encoder.layer.0.attention.output.dense.weight", "encoder.layer.0.attention.output.LayerNorm.weight",
         "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight",
         "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.dense.weight",
         "pooler.dense.weight"]


def test_group_of_tells_the_kinds_apart():
    assert group_of("embeddings.word_embeddings.weight") == ("word emb", "word emb")
    assert group_of("embeddings.LayerNorm.bias") == ("other emb", "other emb")
    assert group_of("encoder.layer.0.attention.output.dense.weight") == ("layer 0 o", "o")
    assert group_of("encoder.layer.0.attention.output.LayerNorm.weight") == ("layer 0 norm", "norm")
    assert group_of("encoder.layer.5.output.dense.bias") == ("layer 5 ffn out", "ffn out")
    assert group_of("encoder.layer.5.intermediate.dense.weight") == ("layer 5 ffn in", "ffn in")
    assert group_of("pooler.dense.weight") == ("other", "other")


def test_groups_cover_every_name_once_and_layers_on_request():
    groups = groups_of(NAMES)
    leaves = [g for g in groups if not g.startswith("all ")]
    assert sorted(n for g in leaves for n in groups[g]) == sorted(NAMES)  # each name in exactly one group
    assert groups["layer 0 q"] == ["encoder.layer.0.attention.self.query.weight",
                                   "encoder.layer.0.attention.self.query.bias"]
    assert groups["all q"] == groups["layer 0 q"] + ["encoder.layer.1.attention.self.query.weight"]
    assert "layer 0" not in groups
    whole = groups_of(NAMES, layers=True)
    assert len(whole["layer 0"]) == 6 and len(whole["layer 1"]) == 2
