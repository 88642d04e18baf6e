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


def test_sdg_int8_auto_is_off_on_plain_avx2_and_on_with_vnni(flags):
    flags("fma avx2")
    on, why = local.local_int8("auto")
    assert not on and "auto" in why and "no int8 dot products" in why
    flags("avx2 avx512f avx512_vnni")
    assert local.local_int8("auto")[0]
    assert local.local_int8("off") == (False, "int8 off (sdg.local.int8=off)")
    flags("fma avx2")
    assert local.local_int8("on")[0]  # asked for by name: the user's call, whatever the CPU


def test_isa_summary_names_every_flag(flags):
    flags("avx2 avx512f")
    line = cpu.isa_summary()
    assert "avx2" in line and "avx512f" in line and "no-avx512_vnni" in line and "no-amx_int8" in line
