"""Tests of the x86-64 level from /proc/cpuinfo flags and of the variant pick."""

from __future__ import annotations

import pytest

from tuwunel_guard.core.cpu import (
    CpuLevel,
    cpu_level,
    cpu_level_from_cpuinfo,
    parse_cpu_flags,
    pick_variant,
    variant_level,
)
from tuwunel_guard.core.image import Platform
from tuwunel_guard.core.platforms import OCI_INDEX, OCI_MANIFEST, IndexEntry

# The flags lines of /proc/cpuinfo on real CPUs (Linux 5.x and 6.x).
QEMU64 = (
    "fpu de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 syscall nx lm rep_good nopl xtopology cpuid tsc_known_freq pni cx16 x2apic hypervisor "
    "lahf_lm svm 3dnowprefetch vmmcall"
)
CORE2_E8400 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx lm constant_tsc arch_perfmon pebs bts rep_good "
    "nopl cpuid aperfmperf pni dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cx16 xtpr pdcm "
    "sse4_1 xsave lahf_lm pti tpr_shadow vnmi flexpriority vpid dtherm"
)
NEHALEM_I7_920 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx rdtscp lm constant_tsc arch_perfmon pebs bts "
    "rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni dtes64 monitor ds_cpl vmx est tm2 "
    "ssse3 cx16 xtpr pdcm sse4_1 sse4_2 popcnt lahf_lm pti ssbd ibrs ibpb stibp tpr_shadow vnmi "
    "flexpriority ept vpid dtherm ida flush_l1d"
)
SANDY_BRIDGE_I7_2600 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx rdtscp lm constant_tsc arch_perfmon pebs bts "
    "rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl "
    "vmx smx est tm2 ssse3 cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic popcnt tsc_deadline_timer "
    "aes xsave avx lahf_lm epb pti ssbd ibrs ibpb stibp tpr_shadow vnmi flexpriority ept vpid "
    "xsaveopt dtherm ida arat pln pts md_clear flush_l1d"
)
# Pentium and Celeron models of recent Intel generations have no AVX: a common home server.
PENTIUM_GOLD_G5400 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon "
    "pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq "
    "dtes64 monitor ds_cpl vmx est tm2 ssse3 sdbg cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic "
    "movbe popcnt tsc_deadline_timer aes xsave rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb "
    "invpcid_single pti ssbd ibrs ibpb stibp tpr_shadow vnmi flexpriority ept vpid ept_ad "
    "fsgsbase tsc_adjust smep erms invpcid mpx rdseed smap clflushopt intel_pt xsaveopt xsavec "
    "xgetbv1 xsaves dtherm arat pln pts hwp hwp_notify hwp_act_window hwp_epp md_clear flush_l1d"
)
HASWELL_I7_4770 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs "
    "bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor "
    "ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe "
    "popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm cpuid_fault epb "
    "invpcid_single pti ssbd ibrs ibpb stibp tpr_shadow vnmi flexpriority ept vpid ept_ad "
    "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid xsaveopt dtherm ida arat pln pts "
    "md_clear flush_l1d"
)
EPYC_7302_ZEN2 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl "
    "nonstop_tsc cpuid extd_apicid aperfmperf pni pclmulqdq monitor ssse3 fma cx16 sse4_1 "
    "sse4_2 movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy "
    "abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core "
    "perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 hw_pstate ssbd mba ibrs ibpb stibp "
    "vmmcall fsgsbase bmi1 avx2 smep bmi2 cqm rdt_a rdseed adx smap clflushopt clwb sha_ni "
    "xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local clzero "
    "irperf xsaveerptr rdpru wbnoinvd arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean "
    "flushbyasid decodeassists pausefilter pfthreshold avic v_vmsave_vmload vgif umip rdpid "
    "overflow_recov succor smca sme sev sev_es"
)
XEON_GOLD_6130_SKYLAKE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon "
    "pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor "
    "ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe "
    "popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault "
    "epb cat_l3 cdp_l3 invpcid_single pti intel_ppin ssbd mba ibrs ibpb stibp tpr_shadow vnmi "
    "flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm "
    "cqm mpx rdt_a avx512f avx512dq rdseed adx smap clflushopt clwb intel_pt avx512cd avx512bw "
    "avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local "
    "dtherm ida arat pln pts pku ospke md_clear flush_l1d"
)
# A KVM guest on AMD EPYC (Zen 4), the machine these tests were written on.
EPYC_ZEN4_GUEST = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl "
    "xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid "
    "sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor "
    "lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext cpuid_fault "
    "vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx "
    "smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 "
    "xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes "
    "vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm"
)


def cpuinfo(*flag_lines: str) -> str:
    """Build /proc/cpuinfo text with one processor block per flags line."""
    blocks = [
        f"processor\t: {number}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
        f"flags\t\t: {flags}\nbugs\t\t: spectre_v1\n"
        for number, flags in enumerate(flag_lines)
    ]
    return "\n".join(blocks)


@pytest.mark.parametrize(
    ("flags", "level", "missing_v3"),
    [
        (QEMU64, 1, ("popcnt", "sse4_1", "sse4_2", "ssse3", "avx", "avx2")),
        (CORE2_E8400, 1, ("popcnt", "sse4_2", "avx")),
        (NEHALEM_I7_920, 2, ("avx", "avx2", "bmi1", "abm (LZCNT)", "movbe", "xsave (OSXSAVE)")),
        (SANDY_BRIDGE_I7_2600, 2, ("avx2", "bmi1", "bmi2", "f16c", "fma", "abm (LZCNT)")),
        (PENTIUM_GOLD_G5400, 2, ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma")),
        (HASWELL_I7_4770, 3, ()),
        (EPYC_7302_ZEN2, 3, ()),
        (XEON_GOLD_6130_SKYLAKE, 4, ()),
        (EPYC_ZEN4_GUEST, 4, ()),
    ],
)
def test_cpu_level_of_real_cpus(flags: str, level: int, missing_v3: tuple[str, ...]) -> None:
    """Flags of real CPUs give their known level and the v3 features they lack."""
    found = cpu_level_from_cpuinfo(cpuinfo(flags, flags))

    assert found.level == level
    assert str(found) == f"x86-64-v{level}"
    for feature in missing_v3:
        assert feature in found.missing(3)
    if level >= 3:
        assert found.missing(3) == ()


def test_missing_lists_exact_features() -> None:
    """missing() lists every feature of the levels up to the one asked, in psABI order."""
    found = cpu_level(SANDY_BRIDGE_I7_2600.split())

    assert found.missing(2) == ()
    assert found.missing(3) == ("avx2", "bmi1", "bmi2", "f16c", "fma", "abm (LZCNT)", "movbe")
    assert found.missing(4)[-5:] == ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
    assert found.missing(1) == ()


def test_cpu_level_is_cumulative() -> None:
    """A CPU with the v3 and v4 flags but without SSE3 (pni) is v1: levels include those below."""
    flags = set(XEON_GOLD_6130_SKYLAKE.split()) - {"pni"}

    found = cpu_level(flags)

    assert found.level == 1
    assert found.missing(4) == ("pni (SSE3)",)


def test_cpu_level_without_xsave() -> None:
    """A kernel booted with noxsave keeps avx2 hidden too, but a lone missing xsave blocks v3."""
    flags = set(HASWELL_I7_4770.split()) - {"xsave"}

    assert cpu_level(flags).level == 2
    assert cpu_level(flags).missing(3) == ("xsave (OSXSAVE)",)


def test_flags_common_to_every_processor() -> None:
    """A flag counts only when every processor lists it."""
    text = cpuinfo(HASWELL_I7_4770, SANDY_BRIDGE_I7_2600, HASWELL_I7_4770)

    assert "avx2" not in parse_cpu_flags(text)
    assert cpu_level_from_cpuinfo(text).level == 2


def test_cpuinfo_without_flags_line() -> None:
    """An ARM /proc/cpuinfo (a Features line, no flags line) raises ValueError."""
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1\n"

    with pytest.raises(ValueError, match="no 'flags' line, so this is not an x86 CPU"):
        cpu_level_from_cpuinfo(arm)


def test_cpuinfo_of_this_host() -> None:
    """The real /proc/cpuinfo of the test host parses when the host is x86."""
    from pathlib import Path

    text = Path("/proc/cpuinfo").read_text()
    if "flags" not in text:
        pytest.skip("not an x86 host")

    found = cpu_level_from_cpuinfo(text)

    assert 1 <= found.level <= 4
    assert "sse2" in found.flags


# --- Variant pick ------------------------------------------------------------------------------

DIGEST_V1 = "sha256:" + "1" * 64
DIGEST_V3 = "sha256:" + "3" * 64
DIGEST_ARM = "sha256:" + "a" * 64
DIGEST_ATTEST = "sha256:" + "e" * 64


def entry(position: int, digest: str, platform: Platform | None, **extra: bool) -> IndexEntry:
    """Build an index entry of a four-entry index."""
    return IndexEntry(position, 4, digest, OCI_MANIFEST, platform, **extra)


TUWUNEL_INDEX = [
    entry(1, DIGEST_V1, Platform("linux", "amd64", "v1")),
    entry(2, DIGEST_V3, Platform("linux", "amd64", "v3")),
    entry(3, DIGEST_ARM, Platform("linux", "arm64", "v8")),
    entry(4, DIGEST_ATTEST, Platform("unknown", "unknown"), attestation=True),
]
TUWUNEL_TAGS = [
    "v1.9.0",
    "v1.9.0-release-all-x86_64-v1-linux-gnu",
    "v1.9.0-release-all-x86_64-v3-linux-gnu",
    "v1.9.0-release-all-aarch64-v8-linux-gnu",
]


def test_pick_v3_on_haswell() -> None:
    """A v3 CPU gets the v3 entry, and the reason names the v3 features it has."""
    choice = pick_variant(TUWUNEL_INDEX, cpu_level(HASWELL_I7_4770.split()))

    assert choice.chosen == TUWUNEL_INDEX[1]
    assert choice.level == 3
    assert choice.reason == (
        "picked x86-64-v3 (entry 2 of 4 (sha256:333333333333…, linux/amd64/v3)) because the "
        "CPU has every v3 feature: avx, avx2, bmi1, bmi2, f16c, fma, abm (LZCNT), movbe, "
        "xsave (OSXSAVE)"
    )


def test_pick_v1_on_pentium() -> None:
    """A CPU without AVX gets v1, and the reason lists the v3 features it lacks."""
    choice = pick_variant(TUWUNEL_INDEX, cpu_level(PENTIUM_GOLD_G5400.split()))

    assert choice.chosen == TUWUNEL_INDEX[0]
    assert choice.level == 1
    assert choice.reason == (
        "picked x86-64-v1 (entry 1 of 4 (sha256:111111111111…, linux/amd64/v1)) because v1 is "
        "the x86-64 baseline; skipped x86-64-v3 (entry 2 of 4 (sha256:333333333333…, "
        "linux/amd64/v3)): the CPU lacks avx, avx2, bmi1, bmi2, f16c, fma"
    )


def test_pick_v3_on_v4_cpu() -> None:
    """A v4 CPU gets the highest variant offered, v3."""
    choice = pick_variant(TUWUNEL_INDEX, cpu_level(XEON_GOLD_6130_SKYLAKE.split()))

    assert choice.chosen == TUWUNEL_INDEX[1]
    assert "skipped" not in choice.reason


def test_pick_ignores_order() -> None:
    """The v3 entry wins on a v3 CPU whether it comes first or last."""
    host = cpu_level(EPYC_7302_ZEN2.split())

    assert pick_variant(list(reversed(TUWUNEL_INDEX)), host).chosen == TUWUNEL_INDEX[1]


def test_pick_first_of_equal_levels() -> None:
    """Two entries of the same level: the first listed wins, as in Docker 26."""
    plain = entry(1, DIGEST_ARM, Platform("linux", "amd64"))
    v1 = entry(2, DIGEST_V1, Platform("linux", "x86_64", "v1"))

    choice = pick_variant([plain, v1], cpu_level(QEMU64.split()))

    assert choice.chosen == plain
    assert choice.level == 1


def test_pick_none_fits() -> None:
    """With only a v3 entry, a v2 CPU gets no pick, and the reason lists what it lacks."""
    choice = pick_variant(TUWUNEL_INDEX[1:], cpu_level(NEHALEM_I7_920.split()))

    assert choice.chosen is None
    assert choice.level is None
    assert choice.reason.startswith("no candidate fits this CPU (x86-64-v2): skipped x86-64-v3")
    assert choice.reason.endswith(
        "the CPU lacks avx, avx2, bmi1, bmi2, f16c, fma, abm (LZCNT), movbe, xsave (OSXSAVE)"
    )


def test_pick_without_x86_candidates() -> None:
    """Only arm64 and attestation entries: nothing names an x86-64 level."""
    choice = pick_variant(TUWUNEL_INDEX[2:], cpu_level(HASWELL_I7_4770.split()))

    assert choice.chosen is None
    assert choice.reason == "no candidate names an x86-64 level"


def test_pick_per_platform_tags() -> None:
    """Per-platform tags are picked by the level in their name."""
    haswell = pick_variant(TUWUNEL_TAGS, cpu_level(HASWELL_I7_4770.split()))
    core2 = pick_variant(TUWUNEL_TAGS, cpu_level(CORE2_E8400.split()))

    assert haswell.chosen == "v1.9.0-release-all-x86_64-v3-linux-gnu"
    assert core2.chosen == "v1.9.0-release-all-x86_64-v1-linux-gnu"
    assert core2.reason == (
        "picked x86-64-v1 (v1.9.0-release-all-x86_64-v1-linux-gnu) because v1 is the x86-64 "
        "baseline; skipped x86-64-v3 (v1.9.0-release-all-x86_64-v3-linux-gnu): the CPU lacks "
        "popcnt, sse4_2, avx, avx2, bmi1, bmi2, f16c, fma, abm (LZCNT), movbe"
    )


@pytest.mark.parametrize(
    ("candidate", "level"),
    [
        ("v1.9.0-release-all-x86_64-v3-linux-gnu", 3),
        ("v1.9.0-release-all-x86_64-v1-linux-gnu", 1),
        ("x86_64-v2", 2),
        ("v1.9.0-release-all-aarch64-v8-linux-gnu", None),
        ("v1.9.0-release-all-x86_64-v5-linux-gnu", None),
        ("v1.9.0-release-all-x86_64-v31-linux-gnu", None),
        ("v1.9.0", None),
        (entry(1, DIGEST_V1, Platform("linux", "amd64")), 1),
        (entry(1, DIGEST_V1, Platform("linux", "amd64", "v4")), 4),
        (entry(1, DIGEST_V1, Platform("linux", "amd64", "v9")), None),
        (entry(1, DIGEST_V1, Platform("linux", "arm64")), None),
        (entry(1, DIGEST_V1, None), None),
        (entry(1, DIGEST_V1, Platform("linux", "amd64"), attestation=True), None),
    ],
)
def test_variant_level(candidate: IndexEntry | str, level: int | None) -> None:
    """Tags and entries name an x86-64 level only for amd64 with v1 to v4."""
    assert variant_level(candidate) == level


def test_index_entry_media_type_irrelevant() -> None:
    """A nested index entry for amd64/v3 counts like a manifest entry."""
    nested = IndexEntry(1, 1, DIGEST_V3, OCI_INDEX, Platform("linux", "amd64", "v3"))

    assert pick_variant([nested], CpuLevel(3, frozenset())).chosen == nested
