"""compare.py's row syntax: methods, aliases, settings, the column scale in values, the row's cfg (no ComfyUI)."""

import pytest

from guidance_kit.comparison.methods import (
    ALL_METHODS,
    METHODS,
    NOT_IN_REPORT,
    MethodSpecError,
    parse_row,
    substitute_scale,
)


def test_rows_parse_with_aliases_and_settings():
    row = parse_row("tcfg+APG:eta=1,momentum=0+pag:scale=2")
    assert [c.method.key for c in row.calls] == ["tcfg", "apg", "pag"]
    assert row.calls[1].settings == (("eta", "1"), ("momentum", "0"))
    assert row.label == "TCFG + APG(eta=1, momentum=0) + PAG(scale=2)"
    assert parse_row("slg").calls[0].method.key == "skip_layer"
    linear = parse_row("linear_ag:threshold=0.9")
    assert linear.calls[0].method.key == "adaptive"
    assert linear.calls[0].settings == (("linear_ag", "true"), ("threshold", "0.9"))
    assert parse_row("fdg:scales={scale}, {scale/2}").calls[0].settings == (("scales", "{scale}, {scale/2}"),)


def test_scale_arithmetic():
    assert substitute_scale("{scale}, {1 + (scale - 1) / 2}", 5) == "5, 3"
    assert substitute_scale("{min(1, scale / 12.5)}", 25) == "1"
    with pytest.raises(MethodSpecError, match="cannot evaluate"):
        substitute_scale("{__import__('os')}", 1)


def test_row_cfg_follows_the_column_unless_set():
    assert parse_row("apg").cfg_at(6) == 6.0
    assert parse_row("pag:scale={scale},cfg=1").cfg_at(6) == 1.0
    assert parse_row("pcg").cfg_at(3) == 5.0  # γ = 2w − 1
    assert parse_row("cfgpp").cfg_at(5) == pytest.approx(0.4)  # λ = ω / 12.5
    assert parse_row("cfgpp").cfg_at(20) == 1.0
    assert parse_row("apg+pcg:cfg=2").cfg_at(7) == 2.0
    assert not parse_row("apg:cfg=1").exact and parse_row("apg").exact


@pytest.mark.parametrize("text,message", [
    ("nope", "unknown method"), ("cfg+apg", "cannot be stacked"), ("pcg+cfgpp_3m", "two samplers"),
    ("apg:cfg={scale", "unbalanced"), ("apg:eta", "not INPUT=VALUE"), ("apg:cfg=many", "not a number"),
])
def test_bad_rows_name_the_problem(text, message):
    with pytest.raises(MethodSpecError, match=message):
        parse_row(text)


def test_every_method_is_in_the_metrics_report():
    covered = {parse_row(text).calls[0].method.key for text in ALL_METHODS}
    assert not covered & set(NOT_IN_REPORT)
    assert covered | set(NOT_IN_REPORT) == set(METHODS)


def test_the_method_list_is_read_from_the_nodes_compare_declarations():
    fdg = METHODS["fdg"]
    assert fdg.node == "cfg_methods:FDGNode" and fdg.label == "FDG" and fdg.exact
    assert fdg.overrides == {"scales": "{scale}, {1 + (scale - 1) / 2}"}
    assert METHODS["skip_layer"].label == "Skip-Layer"  # the declaration's label, not the node's LABEL
    assert METHODS["pcg"].sampler and METHODS["pcg"].cfg == "{2 * scale - 1}"
    assert ALL_METHODS[0] == "cfg" and "beta_cfg:cfg={16 * scale}" in ALL_METHODS
