"""The VMM: KVM vCPUs, guest memory, passthrough wiring and the live-update client.

Only the standard library and cffi are imported at package import time: the
restore path after a kexec must get vCPUs running before anything heavy
(trio, prometheus_client) is loaded -- and the VMM process never loads them:
its control plane (luvmm.vmm.control, trio) runs in a process of its own, which
asks the VMM for what it needs of the VM over luvmm.vmm.link.
"""
