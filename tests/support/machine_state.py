"""A machine state with every section filled in."""


def sample_state():
    from luvmm.vmm.machine_state import (DeviceWiring, GuestState, MachineState, MemoryState, Timestamps, VcpuState)

    return MachineState([VcpuState(0, bytes(144), bytes(312))], MemoryState(64 << 20),
                        DeviceWiring("0000:6a:01.0", 1, 3, 2, True), GuestState({"name": "x", "memory": 64 << 20}),
                        Timestamps({"stopped": 1.5}, {"heartbeat": 7}, {"3": 12}))
