"""The VMM: KVM vCPUs, guest memory, passthrough wiring and the live-update client.

Only the standard library and cffi are imported at package import time: the
restore path after a kexec must get vCPUs running before anything heavy
(trio, prometheus_client) is loaded.
"""
