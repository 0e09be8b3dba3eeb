"""iommufd (drivers/iommu/iommufd), emulated, with the live-update preservation
of Khawaja's series.

Objects live in a per-fd table of u32 ids: IOAS (an address space of areas),
HWPT (a hardware page table: a machine IOMMU domain kept in sync with its
IOAS) and DEVICE (a VFIO device bound to this iommufd).  Rules kept from the
kernel: unknown flags EOPNOTSUPP, non-zero reserved fields EOPNOTSUPP,
unknown ids ENOENT, an object still in use EBUSY, overlapping mappings
EEXIST, unaligned ones EINVAL, a wrong fd type EBADFD.  An IOAS no domain
uses has the whole u64 IOVA space and alignment 1; a domain brings its
aperture (48 bits less the x86 MSI window) and its 4 KiB alignment.

IOMMU_IOAS_MAP of a process virtual address is accepted as the kernel does
(nothing is pinned while no domain uses the IOAS), but the emulated kernel
is another process and cannot pin the caller's memory: whatever would pin
it (a HWPT or an attach over that IOAS, a map into an IOAS a domain uses)
fails with EREMOTE, an errno the real kernel never gives for it (there an
unmapped VA is EFAULT).  luvmm maps guest RAM with IOMMU_IOAS_MAP_FILE.

Live update: IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE marks a HWPT; every area of
its IOAS must come from IOAS_MAP_FILE of a memfd sealed with
F_SEAL_SEAL|F_SEAL_GROW|F_SEAL_SHRINK (EINVAL), and from then on the IOAS is
immutable (EBUSY).  Preserving the iommufd in a LUO session requires each
such memfd to be preserved in the same session already (EINVAL).  After the
kexec the retrieved iommufd has the same object ids, and its marked HWPTs
still point at the machine domains the device kept translating through.

Why this long: it mirrors one kernel subsystem, iommufd with its live-update
handler, rule for rule and errno for errno; the kernel's own files are longer.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
from dataclasses import dataclass, field

from luvmm.devices.emu.iommu import IOMMU_PAGE_SIZE, IOMMU_READ, IOMMU_WRITE
from luvmm.uapi.iommufd import (
    IOMMU_DESTROY,
    IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    IOMMU_HWPT_ALLOC_NEST_PARENT,
    IOMMU_HWPT_ALLOC_PASID,
    IOMMU_HWPT_FAULT_ID_VALID,
    IOMMU_GET_HW_INFO,
    IOMMU_HW_INFO_TYPE_NONE,
    IOMMU_HWPT_ALLOC,
    IOMMU_HWPT_DATA_NONE,
    IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_IOVA_RANGES,
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_MAP_FILE,
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    IOMMU_IOAS_UNMAP,
)
from luvmm.liveupdate.emu.kernel.core import File, KernelError, RealFile, copy_struct, register_subsystem, respond
from luvmm.liveupdate.emu.kernel.luo import FileHandler, LuoFile, register_file_handler
from luvmm.liveupdate.emu.kernel.memfd import is_memfd

MAP_FLAGS = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE
SEALS_FOR_PRESERVE = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
# The IOVA space the emulated IOMMU offers: 48 bits, minus the x86 MSI window.
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)
APERTURE = [(0, MSI_WINDOW[0] - 1), (MSI_WINDOW[1] + 1, (1 << 48) - 1)]
# An IOAS no domain uses: nothing reserved (io_pagetable.c iopt_init_table).
WHOLE = [(0, (1 << 64) - 1)]
ULONG_MAX = (1 << 64) - 1
# hw_pagetable.c iommufd_hwpt_paging_alloc: the flags it knows.
HWPT_VALID_FLAGS = (IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING | IOMMU_HWPT_FAULT_ID_VALID
                    | IOMMU_HWPT_ALLOC_PASID)
# The emulated IOMMU has no nesting, no dirty tracking, no PASID and no
# fault queue: its domain_alloc_paging_flags refuses every flag (-EOPNOTSUPP),
# as the lab's intel-iommu does NEST_PARENT and DIRTY_TRACKING.
HWPT_SUPPORTED_FLAGS = 0
# The errno for "the emulated kernel cannot pin the caller's memory" (see above).
ECANNOTPIN = errno.EREMOTE


@dataclass
class Area:
    iova: int
    length: int
    mem_key: tuple[int, int] | None  # None: a user VA (IOAS_MAP), never pinned here
    offset: int
    perms: int
    sealed: bool
    memfd: RealFile | None = None  # the kernel's reference, while this kernel runs


@dataclass
class Ioas:
    id: int
    areas: list[Area] = field(default_factory=list)
    hwpts: set[int] = field(default_factory=set)
    devices: set[int] = field(default_factory=set)  # attached directly (auto domain)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The usable IOVA ranges: the domain's aperture once one uses the IOAS."""
        return APERTURE if self.hwpts else WHOLE

    @property
    def alignment(self) -> int:
        """iopt.iova_alignment: 1, or the domain's smallest page once there is one."""
        return IOMMU_PAGE_SIZE if self.hwpts else 1

    def find_free(self, length: int) -> int:
        for lo, hi in APERTURE:
            addr = max(lo, IOMMU_PAGE_SIZE)
            for a in sorted(self.areas, key=lambda a: a.iova):
                if a.iova >= addr + length:
                    break
                addr = max(addr, a.iova + a.length)
            if addr + length - 1 <= hi:
                return addr
        raise KernelError(errno.ENOSPC)


@dataclass
class Hwpt:
    id: int
    ioas: int
    domain_id: int
    auto: bool = False
    devices: set[int] = field(default_factory=set)
    preserved_token: int | None = None


@dataclass
class BoundDevice:
    id: int
    vfio: object  # luvmm.liveupdate.emu.kernel.vfio.VfioDeviceFile
    attached: int | None = None  # hwpt id


class IommufdFile(File):
    kind = "iommufd"

    def __init__(self, kernel):
        super().__init__(kernel)
        self.ids = itertools.count(1)
        self.objects: dict[int, object] = {}
        self.preserved = False  # its LUO handler has it
        self.incoming_tokens: set[int] = set()

    def describe(self):
        return f"iommufd({len(self.objects)} objects)"

    def memory(self) -> set[tuple[int, int]]:
        return {area.mem_key for obj in self.objects.values() if isinstance(obj, Ioas)
                for area in obj.areas if area.mem_key is not None}

    # --- object table --------------------------------------------------------------------------

    def _get(self, obj_id: int, kind):
        obj = self.objects.get(obj_id)
        if not isinstance(obj, kind):
            raise KernelError(errno.ENOENT, f"no {kind.__name__} with id {obj_id}")
        return obj

    def _new_id(self) -> int:
        return next(self.ids)

    def machine(self):
        return self.kernel.machine

    def domain(self, hwpt: Hwpt):
        return self.machine().domains[hwpt.domain_id]

    def _immutable(self, ioas: Ioas) -> bool:
        return any(self.objects[h].preserved_token is not None for h in ioas.hwpts)

    # --- ioctls -----------------------------------------------------------------------------------

    def ioctl(self, request, definition, buf, fds, arg):
        if definition is None or definition.argtype is None:
            raise KernelError(errno.ENOTTY)
        handler = {
            IOMMU_DESTROY: (self._destroy, "id"),
            IOMMU_IOAS_ALLOC: (self._ioas_alloc, "out_ioas_id"),
            IOMMU_IOAS_IOVA_RANGES: (self._iova_ranges, "out_iova_alignment"),
            IOMMU_IOAS_MAP: (self._ioas_map, "iova"),
            IOMMU_IOAS_MAP_FILE: (self._ioas_map_file, "iova"),
            IOMMU_IOAS_UNMAP: (self._ioas_unmap, "length"),
            IOMMU_HWPT_ALLOC: (self._hwpt_alloc, "__reserved"),
            IOMMU_GET_HW_INFO: (self._hw_info, "__reserved"),
            IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE: (self._mark_preserve, "hwpt_token"),
        }.get(request)
        if handler is None:
            raise KernelError(errno.ENOTTY)
        fn, min_field = handler
        cmd, size = copy_struct(buf, definition.argtype, min_field)
        try:
            extra = fn(cmd, fds)
        except KernelError as e:
            if getattr(e, "copy_out", False):
                respond(buf, cmd, size)
                e.payload = bytes(buf)
            raise
        respond(buf, cmd, size)
        if extra:
            buf += extra
        return 0

    def _destroy(self, cmd, fds):
        obj = self.objects.get(cmd.id)
        if obj is None:
            raise KernelError(errno.ENOENT)
        if isinstance(obj, BoundDevice):
            # main.c iommufd_object_remove: VFIO holds the device object (users > 1).
            raise KernelError(errno.EBUSY, "the device object is held by its VFIO binding")
        if isinstance(obj, Ioas):
            if obj.hwpts or obj.devices:
                raise KernelError(errno.EBUSY, "IOAS in use")
            self._unmap_all(obj)
        elif isinstance(obj, Hwpt):
            if obj.devices:
                raise KernelError(errno.EBUSY, "HWPT attached to a device")
            if obj.preserved_token is not None and self.preserved:
                raise KernelError(errno.EBUSY, "HWPT is preserved")
            self._free_hwpt(obj)
        del self.objects[cmd.id]

    def _ioas_alloc(self, cmd, fds):
        if cmd.flags:
            raise KernelError(errno.EOPNOTSUPP)
        ioas = Ioas(self._new_id())
        self.objects[ioas.id] = ioas
        cmd.out_ioas_id = ioas.id

    def _iova_ranges(self, cmd, fds):
        if getattr(cmd, "__reserved"):
            raise KernelError(errno.EOPNOTSUPP)
        ioas = self._get(cmd.ioas_id, Ioas)
        ranges = ioas.ranges
        room = cmd.num_iovas
        cmd.num_iovas = len(ranges)
        cmd.out_iova_alignment = ioas.alignment
        if room < len(ranges):
            # The kernel copies num_iovas out, then fails: the caller retries with room.
            error = KernelError(errno.EMSGSIZE)
            error.copy_out = True
            raise error
        return b"".join(lo.to_bytes(8, "little") + hi.to_bytes(8, "little") for lo, hi in ranges[:room])

    @staticmethod
    def _check_map_flags(cmd) -> None:
        """ioas.c iommufd_ioas_map{,_file}: unknown flags EOPNOTSUPP, an iova or
        length of ULONG_MAX or more EOVERFLOW, neither READABLE nor WRITEABLE
        EINVAL -- all before the IOAS is looked up."""
        if cmd.flags & ~MAP_FLAGS:
            raise KernelError(errno.EOPNOTSUPP)
        if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
            raise KernelError(errno.EOVERFLOW)
        if not cmd.flags & (IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE):
            raise KernelError(errno.EINVAL, "a mapping must be readable or writeable")

    def _place(self, ioas: Ioas, cmd, length: int) -> int:
        """The IOVA of a new area: the fixed one, checked, or a free one."""
        if cmd.flags & IOMMU_IOAS_MAP_FIXED_IOVA:
            iova = cmd.iova
            if iova % IOMMU_PAGE_SIZE:
                raise KernelError(errno.EINVAL)
            if not any(lo <= iova and iova + length - 1 <= hi for lo, hi in ioas.ranges):
                raise KernelError(errno.ENOSPC, "IOVA outside the usable ranges")
            if any(a.iova < iova + length and iova < a.iova + a.length for a in ioas.areas):
                raise KernelError(errno.EEXIST)
            return iova
        return ioas.find_free(length)

    def _ioas_map(self, cmd, fds):
        """ioas.c iommufd_ioas_map: the area is recorded, nothing pinned until a
        domain needs the pages -- which this kernel cannot do (ECANNOTPIN)."""
        if getattr(cmd, "__reserved"):
            raise KernelError(errno.EOPNOTSUPP)
        self._check_map_flags(cmd)
        ioas = self._get(cmd.ioas_id, Ioas)
        if self._immutable(ioas):
            raise KernelError(errno.EBUSY, "IOAS is immutable: a HWPT of it is preserved")
        length = cmd.length
        if length == 0 or (cmd.user_va | length) % IOMMU_PAGE_SIZE:
            raise KernelError(errno.EINVAL, "unaligned mapping")
        if ioas.hwpts:
            raise KernelError(ECANNOTPIN, "IOMMU_IOAS_MAP of a user VA into an IOAS a domain uses: the emulated "
                                          "kernel cannot pin another process's memory (use IOMMU_IOAS_MAP_FILE)")
        iova = self._place(ioas, cmd, length)
        perms = (IOMMU_READ if cmd.flags & IOMMU_IOAS_MAP_READABLE else 0) | \
                (IOMMU_WRITE if cmd.flags & IOMMU_IOAS_MAP_WRITEABLE else 0)
        ioas.areas.append(Area(iova, length, None, cmd.user_va, perms, False))
        cmd.iova = iova

    def _ioas_map_file(self, cmd, fds):
        self._check_map_flags(cmd)
        ioas = self._get(cmd.ioas_id, Ioas)
        if self._immutable(ioas):
            raise KernelError(errno.EBUSY, "IOAS is immutable: a HWPT of it is preserved")
        if cmd.fd < 0 or not fds:
            raise KernelError(errno.EBADF)
        fd = fds[0]
        if self.kernel.lookup(fd) is not None or not is_memfd(fd):
            raise KernelError(errno.EINVAL, "IOAS_MAP_FILE needs a memfd")
        length, start = cmd.length, cmd.start
        if length == 0 or (start | length) % IOMMU_PAGE_SIZE:
            raise KernelError(errno.EINVAL, "unaligned mapping")
        if start + length > os.fstat(fd).st_size:
            raise KernelError(errno.EINVAL, "mapping beyond the end of the file")
        iova = self._place(ioas, cmd, length)
        perms = (IOMMU_READ if cmd.flags & IOMMU_IOAS_MAP_READABLE else 0) | \
                (IOMMU_WRITE if cmd.flags & IOMMU_IOAS_MAP_WRITEABLE else 0)
        mem = self.machine().memory_for(fd)
        sealed = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS_FOR_PRESERVE == SEALS_FOR_PRESERVE
        area = Area(iova, length, mem.key, start, perms, sealed, RealFile(fd))
        ioas.areas.append(area)
        for hwpt_id in ioas.hwpts:
            self.domain(self.objects[hwpt_id]).map(iova, mem, start, length, perms)
        cmd.iova = iova

    def _unmap_all(self, ioas: Ioas) -> int:
        total = 0
        for area in list(ioas.areas):
            total += self._unmap_area(ioas, area)
        return total

    def _unmap_area(self, ioas: Ioas, area: Area) -> int:
        for hwpt_id in ioas.hwpts:
            self.domain(self.objects[hwpt_id]).unmap(area.iova, area.length)
        ioas.areas.remove(area)
        if area.memfd is not None:
            area.memfd.close()
        return area.length

    def _ioas_unmap(self, cmd, fds):
        ioas = self._get(cmd.ioas_id, Ioas)
        if self._immutable(ioas):
            raise KernelError(errno.EBUSY, "IOAS is immutable: a HWPT of it is preserved")
        if cmd.iova == 0 and cmd.length == (1 << 64) - 1:
            cmd.length = self._unmap_all(ioas)
            return
        end = cmd.iova + cmd.length
        inside = [a for a in ioas.areas if cmd.iova <= a.iova and a.iova + a.length <= end]
        cut = [a for a in ioas.areas if a.iova < end and cmd.iova < a.iova + a.length and a not in inside]
        if cut or not inside:
            raise KernelError(errno.ENOENT, "unmap must cover whole mapped areas")
        cmd.length = sum(self._unmap_area(ioas, a) for a in inside)

    def _hwpt_alloc(self, cmd, fds):
        """hw_pagetable.c iommufd_hwpt_alloc and iommufd_hwpt_paging_alloc."""
        if getattr(cmd, "__reserved"):
            raise KernelError(errno.EOPNOTSUPP)
        none = cmd.data_type == IOMMU_HWPT_DATA_NONE
        if (none and cmd.data_len) or (not none and not cmd.data_len):
            raise KernelError(errno.EINVAL, "data_type and data_len disagree")
        self._get(cmd.dev_id, BoundDevice)
        pt = self.objects.get(cmd.pt_id)
        if isinstance(pt, Hwpt):
            # iommufd_hwpt_nested_alloc: the emulated IOMMU has no nesting.
            raise KernelError(errno.EOPNOTSUPP, "nested HWPTs are not supported")
        if not isinstance(pt, Ioas):
            raise KernelError(errno.EINVAL, f"pt_id {cmd.pt_id} is no IOAS or HWPT")
        if cmd.flags & ~HWPT_VALID_FLAGS:
            raise KernelError(errno.EOPNOTSUPP)
        if cmd.flags & ~HWPT_SUPPORTED_FLAGS or not none:
            raise KernelError(errno.EOPNOTSUPP, "the emulated IOMMU does not support these HWPT flags or data")
        cmd.out_hwpt_id = self._make_hwpt(pt, auto=False).id

    def _make_hwpt(self, ioas: Ioas, auto: bool) -> Hwpt:
        if any(a.mem_key is None for a in ioas.areas):
            raise KernelError(ECANNOTPIN, "the IOAS has user-VA areas (IOMMU_IOAS_MAP): the emulated kernel cannot "
                                          "pin another process's memory (use IOMMU_IOAS_MAP_FILE)")
        domain_id, domain = self.machine().new_domain()
        hwpt = Hwpt(self._new_id(), ioas.id, domain_id, auto=auto)
        for area in ioas.areas:
            domain.map(area.iova, self.machine().memory[area.mem_key], area.offset, area.length, area.perms)
        ioas.hwpts.add(hwpt.id)
        self.objects[hwpt.id] = hwpt
        return hwpt

    def _free_hwpt(self, hwpt: Hwpt) -> None:
        ioas = self.objects.get(hwpt.ioas)
        if isinstance(ioas, Ioas):
            ioas.hwpts.discard(hwpt.id)
        self.machine().free_domain(hwpt.domain_id)

    def _hw_info(self, cmd, fds):
        # getattr: cffi fields named __reserved would be name-mangled inside a class.
        if any(getattr(cmd, "__reserved")) or cmd.flags:
            raise KernelError(errno.EOPNOTSUPP)
        self._get(cmd.dev_id, BoundDevice)
        cmd.out_data_type = IOMMU_HW_INFO_TYPE_NONE
        cmd.data_len = 0
        cmd.out_max_pasid_log2 = 0
        cmd.out_capabilities = 0

    def _mark_preserve(self, cmd, fds):
        hwpt = self._get(cmd.hwpt_id, Hwpt)
        ioas = self._get(hwpt.ioas, Ioas)
        for area in ioas.areas:
            if not area.sealed:
                raise KernelError(errno.EINVAL, f"area {area.iova:#x} is not a memfd sealed with "
                                                "F_SEAL_SEAL|F_SEAL_GROW|F_SEAL_SHRINK")
        if any(h.preserved_token == cmd.hwpt_token for h in self.objects.values()
               if isinstance(h, Hwpt) and h is not hwpt):
            raise KernelError(errno.EEXIST, "HWPT token in use")
        hwpt.preserved_token = cmd.hwpt_token

    # --- devices (called by VFIO) -------------------------------------------------------------------

    def bind(self, vfio_file) -> int:
        dev = BoundDevice(self._new_id(), vfio_file)
        self.objects[dev.id] = dev
        return dev.id

    def unbind(self, dev_id: int) -> None:
        dev = self.objects.pop(dev_id, None)
        if isinstance(dev, BoundDevice) and dev.attached is not None:
            self.detach(dev)

    def attach(self, dev_id: int, pt_id: int) -> int:
        dev = self._get(dev_id, BoundDevice)
        obj = self.objects.get(pt_id)
        if isinstance(obj, Ioas):
            hwpt = next((self.objects[h] for h in obj.hwpts if self.objects[h].auto), None)
            hwpt = hwpt or self._make_hwpt(obj, auto=True)
        elif isinstance(obj, Hwpt):
            hwpt = obj
        else:
            raise KernelError(errno.ENOENT, f"no IOAS or HWPT {pt_id}")
        if dev.attached is not None and dev.attached != hwpt.id:
            self.detach(dev)
        dev.attached = hwpt.id
        hwpt.devices.add(dev.id)
        return hwpt.id

    def detach(self, dev: BoundDevice) -> None:
        hwpt = self.objects.get(dev.attached)
        dev.attached = None
        if isinstance(hwpt, Hwpt):
            hwpt.devices.discard(dev.id)
            if hwpt.auto and not hwpt.devices:
                self._free_hwpt(hwpt)
                del self.objects[hwpt.id]

    def domain_of(self, dev_id: int):
        dev = self.objects.get(dev_id)
        if not isinstance(dev, BoundDevice) or dev.attached is None:
            return None
        return self.domain(self.objects[dev.attached])

    # --- life cycle -------------------------------------------------------------------------------

    def release(self) -> None:
        """The last fd is gone: every object goes, domains are torn down.
        (At kexec the hardware is left alone: the machine tears down what
        nobody preserved.)"""
        dropping = self.kernel.dropping
        for obj in list(self.objects.values()):
            if isinstance(obj, BoundDevice) and not dropping:
                obj.vfio.iommufd_gone()
        for obj in list(self.objects.values()):
            if isinstance(obj, Hwpt) and not dropping:
                self.machine().free_domain(obj.domain_id)
            elif isinstance(obj, Ioas):
                for area in obj.areas:
                    if area.memfd is not None:
                        area.memfd.close()
        self.objects.clear()


class IommufdSubsystem:
    def __init__(self, kernel):
        self.kernel = kernel

    def open_node(self, path: str) -> IommufdFile | None:
        return IommufdFile(self.kernel) if path == "/dev/iommu" else None

    def list_node(self, path: str) -> None:
        return None

    def drop(self) -> None:
        pass


class IommufdHandler(FileHandler):
    """LUO file handler for iommufd: serializes the marked HWPTs and their IOAS."""

    compatible = "iommufd-v1"

    def can_preserve(self, target) -> bool:
        return isinstance(target, IommufdFile)

    def preserve(self, lf: LuoFile) -> dict:
        lf.target.preserved = True
        return {}

    def unpreserve(self, lf: LuoFile) -> None:
        lf.target.preserved = False

    def _session_memfds(self, lf: LuoFile) -> dict[tuple[int, int], int]:
        """memory key -> token, for the memfds preserved in lf's session."""
        for session in self.kernel.luo.outgoing.values():
            if any(f is lf for f in session.files):
                return {f.identity: f.token for f in session.files if f.handler.compatible == "memfd-v1"}
        return {}

    def freeze(self, lf: LuoFile) -> dict:
        ictx: IommufdFile = lf.target
        memfds = self._session_memfds(lf)
        hwpts, ioases = [], {}
        for obj in ictx.objects.values():
            if isinstance(obj, Hwpt) and obj.preserved_token is not None:
                ioas = ictx.objects[obj.ioas]
                for area in ioas.areas:
                    if area.mem_key not in memfds:
                        raise KernelError(errno.EINVAL, f"HWPT {obj.id}: the memfd behind IOVA {area.iova:#x} "
                                                        "is not preserved in the same session")
                hwpts.append({"id": obj.id, "ioas": obj.ioas, "domain": obj.domain_id,
                              "token": obj.preserved_token})
                ioases[obj.ioas] = {"id": ioas.id, "areas": [
                    {"iova": a.iova, "length": a.length, "offset": a.offset, "perms": a.perms,
                     "dev": a.mem_key[0], "inode": a.mem_key[1], "memfd_token": memfds[a.mem_key]}
                    for a in ioas.areas]}
        return {"hwpts": hwpts, "ioases": list(ioases.values()), "next_id": max(ictx.objects, default=0) + 1}

    def hardware(self, state: dict):
        domains = {h["domain"] for h in state.get("hwpts", [])}
        memory = {(a["dev"], a["inode"]) for i in state.get("ioases", []) for a in i["areas"]}
        return set(), domains, memory

    def restore(self, lf: LuoFile) -> None:
        for h in lf.state.get("hwpts", []):
            if h["domain"] not in self.kernel.machine.domains:
                lf.retrieve_status = -errno.EIO

    def retrieve(self, lf: LuoFile) -> IommufdFile:
        ictx = IommufdFile(self.kernel)
        machine = self.kernel.machine
        for i in lf.state.get("ioases", []):
            ioas = Ioas(i["id"])
            for a in i["areas"]:
                key = (a["dev"], a["inode"])
                if key not in machine.memory:
                    raise KernelError(errno.EIO, "preserved IOAS memory is gone")
                ioas.areas.append(Area(a["iova"], a["length"], key, a["offset"], a["perms"], True))
            ictx.objects[ioas.id] = ioas
        for h in lf.state.get("hwpts", []):
            hwpt = Hwpt(h["id"], h["ioas"], h["domain"], preserved_token=h["token"])
            ictx.objects[hwpt.id] = hwpt
            ictx.objects[h["ioas"]].hwpts.add(hwpt.id)
        ictx.ids = itertools.count(lf.state.get("next_id", 1))
        ictx.incoming_tokens = {h["token"] for h in lf.state.get("hwpts", [])}
        return ictx

    def finish(self, lf: LuoFile) -> None:
        # The HWPTs stay marked; the IOAS becomes mutable again when the user
        # unmarks by destroying them.  Nothing else to release.
        pass


register_subsystem("iommufd", IommufdSubsystem)
register_file_handler(IommufdHandler)
