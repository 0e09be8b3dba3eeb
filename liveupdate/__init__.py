"""Live update: the LUO uAPI and its handles, and (with the emulated host) KHO,
kexec, the host daemon and the LUO agent."""
