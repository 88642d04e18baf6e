"""The CPU facts the engines' defaults follow, and the sdg int8 choice they make."""

from __future__ import annotations

import pytest

from embedtune import cpu
from embedtune.sdg import local


@pytest.fixture
def flags(monkeypatch):
    def use(value):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: None if value is None else frozenset(value.split()))
    return use


@pytest.mark.parametrize(("cpuinfo", "dot"), [
    ("fma avx2", False),                          # Zen 2/3, older Intel: vpmaddubsw saturates
    ("avx2 avx512f avx512_vnni", True),           # AVX-512 VNNI
    ("avx2 avx_vnni", True),                      # Intel consumer chips with AVX-VNNI
    ("avx2 amx_int8", True),
    ("sse4_2", True),                             # no AVX2 at all: not x86's saturating path
    (None, True),                                 # no /proc/cpuinfo (ARM, macOS)
])
def test_int8_dot_products_follow_the_flags(flags, cpuinfo, dot):
    flags(cpuinfo)
    assert cpu.has_int8_dot_product() is dot


def test_sdg_records_which_precision_wrote_its_queries(flags):
    flags("fma avx2")
    assert local.precision_line(True) == "int8 on (" + cpu.isa_summary() + ")"
    why = local.precision_line(False)
    assert why.startswith("int8 off (fp32 projections; ") and "no-avx512_vnni" in why


def test_isa_summary_names_every_flag(flags):
    flags("avx2 avx512f")
    line = cpu.isa_summary()
    assert "avx2" in line and "avx512f" in line and "no-avx512_vnni" in line and "no-amx_int8" in line
