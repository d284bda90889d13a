"""The issue-3 bench methods build the recipes their names promise."""

from __future__ import annotations

from ptqkit.bench import METHODS, BenchConfig


def test_aciq_methods_follow_banner_and_aciq_wa_clips_weights_too() -> None:
    cfg = BenchConfig(w_bits=3, a_bits=3)
    for name, steps in (("aciq", []), ("aciq+bc", ["bias_correction"]),
                        ("aciq+alloc", ["bit_allocation"])):
        r = METHODS[name](cfg)
        # ACIQ clips activations; weights stay per-channel min-max (Banner et al.)
        assert (r.w_range, r.a_range, [s.name for s in r.steps]) == ("minmax", "aciq", steps)
        assert (r.w_bits, r.a_bits, r.first_last_8bit) == (3, 3, True)
    r = METHODS["aciq-wa+bc"](cfg)
    assert (r.w_range, r.a_range, [s.name for s in r.steps]) == ("aciq", "aciq", ["bias_correction"])
    assert [s.name for s in METHODS["lapq"](cfg).steps] == ["lapq"]


def test_seq_adaquant_start_point_methods() -> None:
    cfg = BenchConfig(w_bits=4, a_bits=4)
    # fixed starts: AdaQuant must not switch away from the ranges the method names
    for name, ranges in (("mse+seq-adaquant", ("mse", "mse")), ("aciq+seq-adaquant", ("minmax", "aciq"))):
        r = METHODS[name](cfg)
        assert (r.w_range, r.a_range, [s.name for s in r.steps]) == (*ranges, ["adaquant"])
        assert dict(r.steps[0].options) == {"start": "given"}
    r = METHODS["lapq+seq-adaquant"](cfg)
    assert [s.name for s in r.steps] == ["lapq", "adaquant"]
    assert dict(r.steps[1].options) == {"start": "given"} and (r.w_bits, r.a_bits) == (4, 4)
    r = METHODS["seq-adaquant"](cfg)  # the default: sequential, start chosen by calibration KL
    assert [s.name for s in r.steps] == ["adaquant"] and dict(r.steps[0].options) == {}
