"""QEMU's edu PCI device (hw/misc/edu.c, docs/specs/edu.rst): its BAR0
registers, with the names kvm-unit-tests' driver gives them (lib/pci-edu.h).
The lab's passthrough device: a small DMA engine behind the vIOMMU that a
guest's driver programs through BAR0.

BAR0 (1 MiB, the only BAR): identification, a liveness register that reads
back the inverse of what was written, interrupt status/raise/acknowledge,
and a DMA engine that moves up to 4 KiB between a bus address (an IOVA
behind an IOMMU) and its own buffer at EDU_DMA_START, 100 ms of QEMU's
virtual clock after the command, raising DMA_IRQ when asked (one MSI
vector, or INTx).  Its bus addresses are masked to ``dma_mask`` (28 bits by
default).  A transfer whose range ends exactly at the end of the buffer
makes QEMU 7.2 abort (its range check wants the end strictly inside):
transfers stay strictly inside it.
"""

PCI_VENDOR_ID_QEMU = 0x1234
PCI_DEVICE_ID_EDU = 0x11E8

EDU_BAR = 0
EDU_BAR_SIZE = 1 << 20
EDU_MAGIC = 0xED
EDU_VERSION = 0x100
#: EDU_REG_ID reads (version << 16) | magic.
EDU_ID = EDU_VERSION << 16 | EDU_MAGIC

EDU_REG_ID = 0x00
EDU_REG_ALIVE = 0x04
EDU_REG_FACTORIAL = 0x08
EDU_REG_STATUS = 0x20
EDU_REG_INTR_STATUS = 0x24
EDU_REG_INTR_RAISE = 0x60
EDU_REG_INTR_ACK = 0x64
EDU_REG_DMA_SRC = 0x80
EDU_REG_DMA_DST = 0x88
EDU_REG_DMA_COUNT = 0x90
EDU_REG_DMA_CMD = 0x98

#: EDU_REG_DMA_CMD bits (hw/misc/edu.c: EDU_DMA_RUN, EDU_DMA_DIR, EDU_DMA_IRQ).
EDU_CMD_DMA_START = 0x01
EDU_CMD_DMA_TO = 0x00  # RAM -> the device's buffer
EDU_CMD_DMA_FROM = 0x02  # the device's buffer -> RAM
EDU_CMD_DMA_IRQ = 0x04
#: EDU_REG_INTR_STATUS bit of a finished DMA (hw/misc/edu.c DMA_IRQ).
EDU_DMA_IRQ = 0x100

EDU_DMA_START = 0x40000
EDU_DMA_SIZE_MAX = 4096
EDU_DMA_MASK = (1 << 28) - 1
