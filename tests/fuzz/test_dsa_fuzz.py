"""Hypothesis-generated descriptors: nothing escapes the engine, and the device
never touches memory outside what the IOMMU maps (with the rights it maps)."""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luvmm.devices.emu.dsa import DsaDevice
from luvmm.devices.dsa_regs import IDXD_SWERR_ACK, IDXD_SWERR_OFFSET
from luvmm.devices.emu.dsa_driver import STATE_SIZE, DmaBuffer, DsaDriver
from luvmm.uapi.idxd import DESC, DSA_OPCODE_BATCH
from luvmm.devices.emu.iommu import IOMMU_READ, IommuDomain
from luvmm.devices.emu.memory import PhysMem

MEM = 4 << 20
CANARY = 0x5A
DRIVER_IOVA = 0x1000_0000  # the driver's own state: mem [0, 1 MiB)
RW_IOVA, RW_OFF, RW_LEN = 0x10_0000, 0x10_0000, 0x4_0000  # read-write window
RO_IOVA, RO_OFF, RO_LEN = 0x20_0000, 0x20_0000, 0x1_0000  # read-only window
# Everything from 0x21_0000 on, and 0x14_0000..0x20_0000, is mapped nowhere.

interesting_addr = st.one_of(
    st.integers(RW_IOVA - 0x2000, RW_IOVA + RW_LEN + 0x2000),
    st.integers(RO_IOVA - 0x100, RO_IOVA + RO_LEN + 0x100),
    st.sampled_from([0, 2**64 - 64, 2**63, RW_IOVA + RW_LEN - 32, RO_IOVA]),
    st.integers(0, 2**64 - 1),
)
sizes = st.one_of(st.integers(0, 0x5000), st.sampled_from([2**31, 2**32 - 1, 1, 7, 64]))
opcodes = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x10, 0x11, 0x20]), st.integers(0, 255))
flags = st.one_of(st.integers(0, 0xFFFFFF), st.sampled_from([0x4, 0xC, 0x1C, 0x8C, 0x5, 0xD]))


@st.composite
def descriptors(draw):
    return DESC.pack(draw(st.integers(0, 2**32 - 1)), draw(flags) | draw(opcodes) << 24, draw(interesting_addr),
                     draw(interesting_addr), draw(interesting_addr), draw(sizes), draw(st.integers(0, 15)),
                     draw(st.integers(0, 0xFFFF)), draw(st.binary(min_size=24, max_size=24)))


def test_random_descriptors_stay_inside_the_mappings():
    dev = DsaDevice("0000:00:01.0")
    dev.start()
    fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEM)
    mem = PhysMem(fd)
    domain = IommuDomain()
    domain.map(DRIVER_IOVA, mem, 0, 1 << 20)
    dev.attach_domain(domain)
    drv = DsaDriver(dev, DmaBuffer(mem.view[:STATE_SIZE], DRIVER_IOVA))
    drv.init()
    # The windows the fuzzer aims at live beyond the driver's megabyte.
    domain.map(RW_IOVA, mem, RW_OFF, RW_LEN)
    domain.map(RO_IOVA, mem, RO_OFF, RO_LEN, IOMMU_READ)
    view = mem.view
    outside = [(RW_OFF + RW_LEN, RO_OFF), (RO_OFF + RO_LEN, MEM)]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(desc=descriptors(), batch_list=st.lists(descriptors(), min_size=0, max_size=8),
           ro_content=st.binary(min_size=16, max_size=16))
    def run(desc, batch_list, ro_content):
        for lo, hi in outside:
            view[lo:hi] = bytes([CANARY]) * (hi - lo)
        view[RO_OFF:RO_OFF + RO_LEN] = ro_content * (RO_LEN // 16)
        # A list of random descriptors in the read-write window, for BATCH to find.
        for i, d in enumerate(batch_list):
            view[RW_OFF + 64 * i:RW_OFF + 64 * (i + 1)] = d
        drv.desc_write(desc)
        if desc[7] == DSA_OPCODE_BATCH:
            drv.desc_write(DESC.pack(0, 0x01000000 | 0x4, RW_IOVA + 0x3F000, RW_IOVA, 0, len(batch_list), 0, 0,
                                     bytes(24)))
        assert dev.wait_idle(30)
        assert dev.internal_errors == 0
        for lo, hi in outside:
            assert view[lo:hi] == bytes([CANARY]) * (hi - lo), f"DMA outside the mappings in [{lo:#x}, {hi:#x})"
        assert view[RO_OFF:RO_OFF + RO_LEN] == ro_content * (RO_LEN // 16), "DMA wrote a read-only mapping"
        # Errors are reported where software looks, and the device goes on.
        drv.writeq(IDXD_SWERR_OFFSET, IDXD_SWERR_ACK)
        assert drv.readq(IDXD_SWERR_OFFSET) == 0

    try:
        run()
        assert dev.enabled and dev.wqs[0].enabled
    finally:
        dev.shutdown()
        drv.mem.view.release()
        view.release()
        mem.close()
        os.close(fd)
