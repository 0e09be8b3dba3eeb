"""`luvmm lab build`'s pieces: the config fragment and its check, the cache
key, the private apt set-up read from the machine's sources; and, with a lab
kernel built, that its .config holds the fragment, which carries the upstream
LUO selftests' own config."""

import os

from luvmm.lab import LAB_CONFIG
from luvmm.lab import debian
from luvmm.lab.build import Source, build_key, config_mismatches, fragments_for, parse_fragment


def test_fragment_lines_and_the_check():
    wanted = parse_fragment("# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\nnot a line\n")
    assert wanted == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"'}
    final = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n"
    assert config_mismatches(final, wanted) == []
    bad = config_mismatches("CONFIG_B=y\n", wanted)
    assert "CONFIG_A=y (the final .config has n)" in bad and "CONFIG_B=n (the final .config has y)" in bad


def test_the_key_follows_the_source_version_and_every_fragment(tmp_path):
    base = fragments_for([])
    a = Source("/t", "debian:linux-source-7.2=7.2.13-1", "")
    b = Source("/t", "debian:linux-source-7.2=7.2.14-1", "")
    extra = tmp_path / "extra.config"
    extra.write_text("CONFIG_VFIO_PCI_LIVEUPDATE=y\n")
    assert build_key(a, base) == build_key(a, fragments_for([]))
    assert len({build_key(a, base), build_key(b, base), build_key(a, fragments_for([str(extra)]))}) == 3


def test_the_fragment_has_what_the_lab_needs():
    wanted = parse_fragment(open(LAB_CONFIG).read())
    for option in ("CONFIG_LIVEUPDATE", "CONFIG_KEXEC_HANDOVER", "CONFIG_LIVEUPDATE_MEMFD", "CONFIG_IOMMUFD",
                   "CONFIG_VFIO_DEVICE_CDEV", "CONFIG_VFIO_PCI", "CONFIG_INTEL_IOMMU", "CONFIG_IRQ_REMAP",
                   "CONFIG_KVM", "CONFIG_KVM_AMD", "CONFIG_KVM_INTEL", "CONFIG_9P_FS", "CONFIG_KEXEC_FILE"):
        assert wanted.get(option) == "y", option
    for trimmed in ("CONFIG_DRM", "CONFIG_SOUND", "CONFIG_WIRELESS", "CONFIG_MODULES"):
        assert wanted.get(trimmed) == "n", trimmed


def test_the_mirror_comes_from_the_machines_sources(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    assert debian.mirror_from_system(str(etc)) == ("http://mirror.example/debian",
                                                   "/usr/share/keyrings/debian-archive-keyring.gpg")
    one_line = tmp_path / "old"
    (one_line / "sources.list.d").mkdir(parents=True)
    (one_line / "sources.list").write_text("deb [signed-by=/k.gpg] http://old.example/debian bookworm main\n")
    assert debian.mirror_from_system(str(one_line)) == ("http://old.example/debian", "/k.gpg")


def test_the_private_apt_changes_nothing_of_the_systems(tmp_path):
    apt = debian.PrivateApt(str(tmp_path / "apt"), "http://mirror.example/debian", "/k.gpg")
    options = apt._options()
    for setting in ("Dir::Etc::SourceList", "Dir::Etc::SourceParts=/dev/null", "Dir::State::Lists", "Dir::Cache=",
                    "Dir::Cache::Archives"):
        assert any(o.startswith(setting) for o in options), setting
    assert all(str(tmp_path) in o for o in options if o.startswith(("Dir::Etc::SourceList", "Dir::State::Lists",
                                                                     "Dir::Cache")))


def test_the_built_kernel_holds_the_fragment_and_the_selftests_config(lab_kernel):
    wanted = {}
    for _, text in fragments_for([]):
        wanted.update(parse_fragment(text))
    assert config_mismatches(open(os.path.join(lab_kernel["build_dir"], ".config")).read(), wanted) == []
    upstream = parse_fragment(open(os.path.join(lab_kernel["source"]["tree"], "tools", "testing", "selftests",
                                                "liveupdate", "config")).read())
    assert upstream and {k: wanted.get(k) for k in upstream} == upstream
